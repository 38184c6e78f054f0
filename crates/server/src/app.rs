//! Wiring: builds the engine from configuration and runs the gRPC server until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use reflex_core::{Backends, Engine, ItemIndex};
use reflex_models::{ContentEmbeddings, HybridRetriever, OnlineMf, Signals};
use reflex_storage::Stores;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::config::Config;
use crate::instrumented::Instrumented;
use crate::metrics::Metrics;
use crate::middleware::{
    AdmissionLayer, AuthLayer, DeadlineLayer, GrpcMetricsLayer, OversizeAsResourceExhausted,
    Startup, WhenReady,
};
use crate::proto;
use crate::refit::Refitter;
use crate::services::Reflex;

/// How often the server pings an HTTP/2 connection to check its client is still there.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection (and its streams) is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens (or connects to) the backend `config.store` names; one backend fills every
/// storage role.
pub async fn open_stores(config: &Config) -> anyhow::Result<Stores> {
    config
        .store
        .open(&config.profiles)
        .await
        .with_context(|| config.store.opening())
}

/// Builds the backends named by `config` (each decorated to record its latency and
/// failures into `metrics`) and the engine over them, and replays the event log so the
/// engine is ready to serve.
pub async fn build_engine(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<Engine>> {
    config.validate()?;
    let items = Arc::new(ItemIndex::new());
    let model = OnlineMf::new(config.model.clone()).context("building the model")?;
    // Built empty before the replay; its background thread indexes items as they come.
    let retriever = Arc::new(
        HybridRetriever::for_model(&model, config.retrieval.clone())
            .context("building the item index")?,
    );
    let stores = open_stores(config).await?;
    let backends = Backends {
        sink: Instrumented::new(stores.sink.clone(), metrics.clone()),
        profiles: Instrumented::new(stores.profiles.clone(), metrics.clone()),
        catalog: Instrumented::new(stores.catalog.clone(), metrics.clone()),
        model,
        retriever,
        items,
        models: stores.models.clone(),
    };
    let mut engine =
        Engine::new(backends, config.engine.clone()).with_quality(config.quality.clone());
    if config.content.enabled() {
        let content = ContentEmbeddings::new(config.content.clone(), config.retrieval.clone())
            .context("building the content index")?;
        engine = engine.with_content(Arc::new(content), config.content.blend_weight);
    }
    if config.signals.enabled {
        let signals =
            Signals::new(config.signals.clone()).context("building the behaviour signals")?;
        engine = engine.with_signals(Arc::new(signals));
    }
    if config.store.backend.is_shared() {
        engine = engine.following_the_log();
    }
    let engine = Arc::new(engine);
    let started = std::time::Instant::now();
    let replayed = match engine.recover().await {
        Ok(replayed) => replayed,
        Err(err) => {
            // A failed start may be retried: close this attempt's connections.
            stores.close().await;
            return Err(err).context("replaying the event log");
        }
    };
    // Replayed events were scored when they first came; score from here on.
    engine.start_quality();
    info!(
        replayed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state recovered"
    );
    let weak = Arc::downgrade(&engine);
    if let Err(err) = metrics.watch_recall(move || weak.upgrade()?.recall_checks()) {
        warn!(error = %format!("{err:#}"), "the retrieval recall metrics are not exported");
    }
    let weak = Arc::downgrade(&engine);
    if let Err(err) = metrics.watch_backlog(move || weak.upgrade()?.retrieval_backlog()) {
        warn!(error = %format!("{err:#}"), "the retrieval backlog metric is not exported");
    }
    Ok(engine)
}

/// How far [`serve`] has come, as told to its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Listening, with health NOT_SERVING and every other call answered `UNAVAILABLE`:
    /// the shared store could not be reached and opening it is being retried.
    WaitingForStore,
    /// State recovered; requests are served.
    Ready,
}

/// The first wait before trying to open an unreachable store again.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Whether `err` says a backend could not be reached, which retrying may fix (as opposed
/// to a configuration error or corrupt data, which it will not).
fn is_unreachable(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<reflex_core::Error>(),
            Some(reflex_core::Error::Unavailable { .. })
        )
    })
}

/// Builds the engine as [`build_engine`] does; with a shared backend that cannot be
/// reached, retries with capped exponential backoff (each failure logged and counted in
/// `reflex_backend_errors_total{op="startup"}`), calling `on_waiting` after the first.
/// `None` when `stop` turns true first. Any other failure, and any failure of the
/// embedded store, is returned at once.
async fn start_engine(
    config: &Config,
    metrics: &Arc<Metrics>,
    startup: &Startup,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut on_waiting: impl FnMut(),
) -> anyhow::Result<Option<Arc<Engine>>> {
    let max_wait = Duration::from_millis(config.store.connect_retry_max_ms);
    let mut wait = FIRST_RETRY;
    let mut attempt = 1u64;
    loop {
        let built = tokio::select! {
            built = build_engine(config, metrics) => built,
            _ = stop.wait_for(|stop| *stop) => return Ok(None),
        };
        let err = match built {
            Ok(engine) => {
                startup.set_store_unreachable(false);
                return Ok(Some(engine));
            }
            Err(err) if config.store.backend.is_shared() && is_unreachable(&err) => err,
            Err(err) => return Err(err),
        };
        metrics.backend_errors.with_label_values(&["startup"]).inc();
        warn!(
            error = %format!("{err:#}"),
            attempt,
            retry_in_ms = wait.as_millis() as u64,
            "the store is not reachable at start-up; health stays NOT_SERVING until it is"
        );
        if attempt == 1 {
            startup.set_store_unreachable(true);
            on_waiting();
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => return Ok(None),
        }
        wait = (wait * 2).min(max_wait);
        attempt += 1;
    }
}

/// Runs the server on `listener` until `shutdown` resolves, then drains, checkpoints
/// and returns.
///
/// The listener answers at once: health reports NOT_SERVING and every other call
/// `UNAVAILABLE` while the store is opened and state recovered (with a shared backend
/// that cannot be reached, retried until it can), then SERVING. `on_progress` is told
/// with the gRPC address (and the metrics address, when enabled) when the server is
/// waiting for its store and when it is ready. Configuration errors (API keys, TLS
/// files, the metrics address, store settings) end it at once.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut on_progress: impl FnMut(Progress, SocketAddr, Option<SocketAddr>),
) -> anyhow::Result<()> {
    // A configuration built in code has not been through `Config::load`.
    config.validate()?;
    let keys = if config.auth.enabled {
        let keys = config.auth.load_keys()?;
        anyhow::ensure!(
            !keys.is_empty(),
            "auth is enabled but no API key is configured"
        );
        Some(keys)
    } else {
        None
    };
    let tls = if config.tls.enabled {
        Some(config.tls.server_config()?)
    } else {
        None
    };
    let metrics = Metrics::new().context("registering metrics")?;
    let mirror = sink_mirror(&config, &metrics)?;
    let addr = listener.local_addr().context("reading the bound address")?;

    // The caller's shutdown, as a flag both the start-up and the server watch.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    // Reflection v1 and, for older clients such as grpcurl before 1.9, v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;

    use proto::catalog_service_server::CatalogServiceServer;
    use proto::event_service_server::EventServiceServer;
    use proto::model_service_server::ModelServiceServer;
    use proto::profile_service_server::ProfileServiceServer;
    use proto::recommend_service_server::RecommendServiceServer;
    // The API services exist from the start and answer UNAVAILABLE until the engine is
    // recovered and they are set.
    let startup = Startup::new(config.limits.retry_pushback_ms);
    crate::convert::set_retry_pushback_ms(config.limits.retry_pushback_ms);
    let events = WhenReady::<EventServiceServer<Reflex>>::new(startup.clone());
    let recommend = WhenReady::<RecommendServiceServer<Reflex>>::new(startup.clone());
    let catalog = WhenReady::<CatalogServiceServer<Reflex>>::new(startup.clone());
    let profiles = WhenReady::<ProfileServiceServer<Reflex>>::new(startup.clone());
    let models = WhenReady::<ModelServiceServer<Reflex>>::new(startup.clone());
    let set_health = |status: tonic_health::ServingStatus| {
        let health = health.clone();
        async move { set_readiness(&health, status).await }
    };
    // The reporter starts with "" SERVING; nothing is served before recovery.
    set_health(tonic_health::ServingStatus::NotServing).await;
    // Liveness asks only whether the process answers: a store outage (a full disk,
    // Redis down) turns readiness NOT_SERVING, and a restart would not fix it.
    health
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;

    let otlp_metrics = config.telemetry.otlp_endpoint.clone().map(|endpoint| {
        tokio::spawn(crate::otlp_metrics::run(
            metrics.clone(),
            endpoint,
            config.telemetry.service_name.clone(),
            Duration::from_millis(config.telemetry.otlp_metrics_interval_ms),
        ))
    });
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let console = config
        .console
        .enabled
        .then(|| crate::console::Console::start(metrics.clone(), keys.clone().map(AuthLayer::new)));
    let metrics_addr = if config.metrics.enabled {
        let metrics_listener = TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("binding the metrics endpoint {}", config.metrics.listen))?;
        let metrics_addr = metrics_listener.local_addr().ok();
        let metrics = metrics.clone();
        let console = console.as_ref().map(crate::console::Console::router);
        tokio::spawn(async move {
            let stop = async {
                let _ = metrics_stopped.await;
            };
            if let Err(err) = crate::metrics::serve(metrics, metrics_listener, console, stop).await
            {
                warn!(error = %err, "metrics endpoint failed");
            }
        });
        metrics_addr
    } else {
        None
    };

    // Shutdown: health turns NOT_SERVING, then after the drain delay the server stops
    // accepting and lets open calls finish; after the grace period whatever is still
    // open is closed so the process always exits. A server still starting has no
    // traffic to drain and skips the delay.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain_delay = Duration::from_millis(config.drain_delay_ms);
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let (draining_streams, draining) = tokio::sync::watch::channel(false);
    let server_shutdown = {
        let mut stop = stop.clone();
        let ready = ready.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
            set_health(tonic_health::ServingStatus::NotServing).await;
            if ready.load(std::sync::atomic::Ordering::Acquire) {
                info!(drain_delay_ms = drain_delay.as_millis() as u64, "draining");
                tokio::time::sleep(drain_delay).await;
            }
            // Event streams ack the batch in hand and end; unary calls finish.
            let _ = draining_streams.send(true);
            let _ = draining_tx.send(());
        }
    };
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let grace_elapsed = async move {
        if draining_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let layers = tower::ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .layer(DeadlineLayer {
            max: Duration::from_millis(config.limits.max_call_ms),
        })
        .layer(AdmissionLayer::new(
            config.limits.max_concurrent_calls,
            config.limits.max_streams,
            config.limits.retry_pushback_ms,
            metrics.clone(),
        ))
        .option_layer(keys.as_ref().map(|keys| AuthLayer::new(keys.clone())))
        .layer(OversizeAsResourceExhausted)
        .into_inner();
    // HTTP/2 pings find connections whose client vanished without closing them (a host
    // that died, a dropped NAT entry), so their event streams end and free their
    // `limits.max_streams` permits instead of holding them forever.
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("configuring TLS")?;
    }
    let serving = server
        .layer(layers)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(events.clone())
        .add_service(recommend.clone())
        .add_service(catalog.clone())
        .add_service(profiles.clone())
        .add_service(models.clone())
        .serve_with_incoming_shutdown(incoming(listener), server_shutdown);
    let serving = async move {
        tokio::select! {
            served = serving => served.context("serving gRPC"),
            () = grace_elapsed => {
                warn!(grace_ms = grace.as_millis() as u64, "grace period over, closing open calls");
                Ok(())
            }
        }
    };
    tokio::pin!(serving);

    // Recover while the listener answers probes; give up only on what retrying cannot fix.
    let started = tokio::select! {
        result = &mut serving => Err(result),
        started = start_engine(&config, &metrics, &startup, stop.clone(), || {
            on_progress(Progress::WaitingForStore, addr, metrics_addr);
        }) => Ok(started),
    };
    let engine = match started {
        Ok(Ok(Some(engine))) => engine,
        // Stopped before the engine was ready: nothing to checkpoint.
        Ok(Ok(None)) => {
            info!("shutdown requested while starting");
            let result = serving.await;
            stop_side_tasks(otlp_metrics, metrics_stop);
            return result;
        }
        Ok(Err(err)) => {
            stop_side_tasks(otlp_metrics, metrics_stop);
            return Err(err);
        }
        Err(result) => {
            stop_side_tasks(otlp_metrics, metrics_stop);
            return result;
        }
    };

    let maintenance = {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let every = Duration::from_millis(config.maintenance_interval_ms);
        let rebuild_every = Duration::from_millis(config.retrieval.rebuild_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_rebuild = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                if !rebuild_every.is_zero() && last_rebuild.elapsed() >= rebuild_every {
                    last_rebuild = tokio::time::Instant::now();
                    engine.reindex_in_background();
                }
                if let Err(err) = engine.maintain().await {
                    metrics
                        .backend_errors
                        .with_label_values(&["maintain"])
                        .inc();
                    warn!(error = %err, "maintenance failed, retrying next tick");
                }
                metrics.index_items.set(engine.items().len() as i64);
                if let Ok(n) = engine.profile_count().await {
                    metrics.profiles.set(n as i64);
                }
            }
        })
    };

    let follower = config.store.backend.is_shared().then(|| {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let every = Duration::from_millis(config.store.follow_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = engine.follow().await {
                    metrics.backend_errors.with_label_values(&["follow"]).inc();
                    warn!(error = %err, "following the event log failed, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        })
    });

    let replica: Arc<str> = config.versions.replica().into();
    if let Some(console) = &console {
        console.set_engine(engine.clone(), replica.clone());
    }
    let refitter = Arc::new(Refitter::new(
        engine.clone(),
        config.refit.clone(),
        config.model.clone(),
        config.engine.weights.clone(),
    ));
    let learner = {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let versions = config.versions.clone();
        let shared = config.store.backend.is_shared();
        let replica = replica.clone();
        let refitter = refitter.clone();
        tokio::spawn(async move {
            run_learner(engine, metrics, versions, shared, replica, refitter).await
        })
    };

    let source = match start_source(
        &config,
        &engine,
        &metrics,
        mirror.clone(),
        stop.clone(),
        &health,
    )
    .await
    {
        Ok(source) => source,
        Err(err) => {
            stop_side_tasks(otlp_metrics, metrics_stop);
            return Err(err);
        }
    };
    let reflex = Reflex::new(engine.clone(), metrics.clone(), draining, replica.clone())
        .with_refitter(refitter)
        .with_mirror(mirror);
    let limit = config.max_message_bytes;
    events.set(EventServiceServer::new(reflex.clone()).max_decoding_message_size(limit));
    recommend.set(RecommendServiceServer::new(reflex.clone()).max_decoding_message_size(limit));
    catalog.set(CatalogServiceServer::new(reflex.clone()).max_decoding_message_size(limit));
    profiles.set(ProfileServiceServer::new(reflex.clone()).max_decoding_message_size(limit));
    models.set(ModelServiceServer::new(reflex).max_decoding_message_size(limit));
    ready.store(true, std::sync::atomic::Ordering::Release);
    if !*stop.borrow() {
        set_health(tonic_health::ServingStatus::Serving).await;
    }
    // Readiness follows whether the store takes writes (a full disk, a store that
    // stopped writing, an unreachable backend), checked every second.
    let readiness = {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        let reporter = health.clone();
        tokio::spawn(async move {
            let mut writable = true;
            let mut tick = tokio::time::interval(STORE_HEALTH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let health = engine.sink_health().await;
                if let Some(disk) = health.disk {
                    let gauge = |kind: &str, bytes: u64| {
                        metrics
                            .store_disk_bytes
                            .with_label_values(&[kind])
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    };
                    gauge("free", disk.free_bytes);
                    gauge("total", disk.total_bytes);
                    gauge("floor", disk.floor_bytes);
                }
                let now_writable = health.unwritable.is_none();
                metrics.store_writable.set(i64::from(now_writable));
                if now_writable == writable || *stop.borrow() {
                    continue;
                }
                writable = now_writable;
                match &health.unwritable {
                    Some(why) => {
                        warn!(reason = %why, "the store refuses writes: readiness NOT_SERVING");
                        set_readiness(&reporter, tonic_health::ServingStatus::NotServing).await;
                    }
                    None => {
                        info!("the store takes writes again: readiness SERVING");
                        set_readiness(&reporter, tonic_health::ServingStatus::Serving).await;
                    }
                }
            }
        })
    };
    on_progress(Progress::Ready, addr, metrics_addr);
    info!(%addr, ?metrics_addr, auth = keys.is_some(), "reflex serving");

    let result = serving.await;
    readiness.abort();
    // The source ends its batch in hand (committed) once `stop` is true.
    source.stopped().await;
    maintenance.abort();
    learner.abort();
    if let Some(follower) = follower {
        follower.abort();
        // Learn what other replicas (or this one's last batches) appended, so a
        // shutdown snapshot misses nothing.
        if let Err(err) = engine.follow().await {
            warn!(error = %err, "last read of the event log failed");
        }
    }
    let holds_lease = engine
        .acquire_learner_lease(
            &replica,
            LeaseSchedule::for_ttl(config.versions.lease_ttl_ms).lifetime_ms,
        )
        .await
        .unwrap_or(false);
    if holds_lease {
        if config.versions.snapshot_on_shutdown {
            match engine.snapshot("shutdown", &replica).await {
                Ok(v) => info!(version = v.id, "shutdown snapshot saved"),
                Err(err) => warn!(error = %err, "shutdown snapshot failed"),
            }
        }
        if let Err(err) = engine.release_learner_lease(&replica).await {
            warn!(error = %err, "releasing the learner lease failed; it expires by itself");
        }
    }
    stop_side_tasks(otlp_metrics, metrics_stop);
    match engine.checkpoint().await {
        Ok(seq) => info!(?seq, "final checkpoint written"),
        Err(err) => warn!(error = %err, "final checkpoint failed; the log replays on start"),
    }
    result
}

/// The Kafka sink that mirrors accepted events, when `sink.kafka` is enabled.
#[cfg(feature = "kafka")]
fn sink_mirror(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<dyn crate::services::EventMirror>>> {
    if !config.sink.kafka.enabled {
        return Ok(None);
    }
    let mirror = crate::kafka::KafkaMirror::new(&config.sink.kafka, metrics.clone())
        .context("starting the Kafka sink (sink.kafka)")?;
    info!(topic = %config.sink.kafka.topic, "accepted events are mirrored to kafka");
    Ok(Some(Arc::new(mirror)))
}

/// Without the `kafka` feature an enabled sink is refused.
#[cfg(not(feature = "kafka"))]
fn sink_mirror(
    config: &Config,
    _metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<dyn crate::services::EventMirror>>> {
    if config.sink.kafka.enabled {
        bail!("sink.kafka is enabled but this reflex was built without the `kafka` feature");
    }
    Ok(None)
}

/// The Kafka source, when `source.kafka` is enabled: consuming until `stop`, its broker
/// reachability reported as the health service `reflex.source.kafka` every second.
#[cfg(feature = "kafka")]
async fn start_source(
    config: &Config,
    engine: &Arc<Engine>,
    metrics: &Arc<Metrics>,
    mirror: Option<Arc<dyn crate::services::EventMirror>>,
    stop: tokio::sync::watch::Receiver<bool>,
    health: &tonic_health::server::HealthReporter,
) -> anyhow::Result<SourceTask> {
    use crate::kafka::{SOURCE_HEALTH_SERVICE, Source};
    if !config.source.kafka.enabled {
        return Ok(SourceTask(None));
    }
    let source = Source::start(
        &config.source.kafka,
        config.engine.max_batch,
        engine.clone(),
        metrics.clone(),
        mirror,
        stop,
    )
    .context("starting the Kafka source (source.kafka)")?;
    let reachable = source.reachability();
    let reporter = health.clone();
    let reporting = tokio::spawn(async move {
        use tonic_health::ServingStatus;
        reporter
            .set_service_status(SOURCE_HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        let mut was = false;
        let mut tick = tokio::time::interval(STORE_HEALTH_INTERVAL);
        loop {
            tick.tick().await;
            let up = reachable.load(std::sync::atomic::Ordering::Relaxed);
            if up != was {
                was = up;
                if up {
                    info!("the kafka source reaches its brokers");
                } else {
                    warn!("the kafka source reaches no broker");
                }
                let status = if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter
                    .set_service_status(SOURCE_HEALTH_SERVICE, status)
                    .await;
            }
        }
    });
    Ok(SourceTask(Some((source, reporting))))
}

/// Without the `kafka` feature an enabled source is refused.
#[cfg(not(feature = "kafka"))]
async fn start_source(
    config: &Config,
    _engine: &Arc<Engine>,
    _metrics: &Arc<Metrics>,
    _mirror: Option<Arc<dyn crate::services::EventMirror>>,
    _stop: tokio::sync::watch::Receiver<bool>,
    _health: &tonic_health::server::HealthReporter,
) -> anyhow::Result<SourceTask> {
    if config.source.kafka.enabled {
        bail!("source.kafka is enabled but this reflex was built without the `kafka` feature");
    }
    Ok(SourceTask())
}

/// The running Kafka source (and its health reporting), if any.
struct SourceTask(#[cfg(feature = "kafka")] Option<(crate::kafka::Source, JoinHandle<()>)>);

impl SourceTask {
    /// Waits for the source to finish its batch in hand and leave its group.
    async fn stopped(self) {
        #[cfg(feature = "kafka")]
        if let Some((source, reporting)) = self.0 {
            reporting.abort();
            source.stopped().await;
        }
    }
}

/// Stops the OTLP metrics export and the `/metrics` endpoint.
/// The gRPC health service name that liveness probes ask: SERVING for as long as the
/// process answers, whatever the store's state (readiness reports that).
pub const LIVENESS_SERVICE: &str = "liveness";

/// Sets the readiness of the server (`""`) and of every API service.
async fn set_readiness(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    use proto::catalog_service_server::CatalogServiceServer;
    use proto::event_service_server::EventServiceServer;
    use proto::model_service_server::ModelServiceServer;
    use proto::profile_service_server::ProfileServiceServer;
    use proto::recommend_service_server::RecommendServiceServer;
    use tonic::server::NamedService;
    for name in [
        "",
        <EventServiceServer<Reflex> as NamedService>::NAME,
        <RecommendServiceServer<Reflex> as NamedService>::NAME,
        <CatalogServiceServer<Reflex> as NamedService>::NAME,
        <ProfileServiceServer<Reflex> as NamedService>::NAME,
        <ModelServiceServer<Reflex> as NamedService>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

/// How often readiness asks the store whether it takes writes.
const STORE_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The accepted connections of the gRPC listener, with Nagle's algorithm off.
///
/// A response leaves in two writes (headers and message, then the trailers); with Nagle on,
/// the trailers of any answer over about a kilobyte wait for the client's delayed ACK,
/// which costs 40 ms per call with clients that delay ACKs (grpcio, Java).
fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

fn stop_side_tasks(otlp_metrics: Option<JoinHandle<()>>, metrics_stop: oneshot::Sender<()>) {
    if let Some(export) = otlp_metrics {
        export.abort();
    }
    let _ = metrics_stop.send(());
}

/// A server running as a task on this runtime: what `reflex demo` and `reflex bench`
/// drive when no address is given.
pub struct InProcess {
    /// `http://HOST:PORT` of the server.
    pub endpoint: String,
    /// Where it serves `/metrics`, when metrics are on.
    pub metrics_addr: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts a server with `config` and waits until it serves.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<(SocketAddr, Option<SocketAddr>)>();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(crate::app::serve(
            config,
            listener,
            async {
                let _ = stop_rx.await;
            },
            move |progress, addr, metrics_addr| {
                if progress == Progress::Ready
                    && let Some(ready_tx) = ready_tx.take()
                {
                    let _ = ready_tx.send((addr, metrics_addr));
                }
            },
        ));
        match ready_rx.await {
            Ok((addr, metrics_addr)) => Ok(Self {
                endpoint: format!("http://{addr}"),
                metrics_addr,
                stop,
                task,
            }),
            Err(_) => match task.await {
                Ok(Err(err)) => Err(err.context("starting the server")),
                _ => bail!("the server stopped before it was ready"),
            },
        }
    }

    /// Shuts the server down and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .context("joining the server task")?
            .context("the in-process server failed")
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutdown requested");
}

/// The learner's duties, on every replica: take or renew the learner lease (a replica
/// that holds it takes the scheduled snapshots, prunes old versions and acts on the
/// automatic rollback when quality drops; on one machine the lease is always granted),
/// apply rollbacks other replicas recorded, and publish the quality figures. The learner
/// also refits the batch baseline every `refit.interval_ms`, in a task of its own.
async fn run_learner(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    versions: crate::config::VersionsConfig,
    shared: bool,
    replica: Arc<str>,
    refitter: Arc<Refitter>,
) {
    let schedule = LeaseSchedule::for_ttl(versions.lease_ttl_ms);
    let snapshot_every = Duration::from_millis(versions.snapshot_interval_ms);
    let refit_every = Duration::from_millis(refitter.config().interval_ms);
    let mut last_snapshot = tokio::time::Instant::now();
    let mut last_refit = tokio::time::Instant::now();
    let mut refitting: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_duties = tokio::time::Instant::now();
    let mut was_learner = false;
    loop {
        let learner = match engine
            .acquire_learner_lease(&replica, schedule.lifetime_ms)
            .await
        {
            Ok(held) => held,
            Err(err) => {
                metrics.backend_errors.with_label_values(&["lease"]).inc();
                warn!(error = %err, "learner lease check failed");
                false
            }
        };
        // The lease holder renews every third of its lifetime; the others check often,
        // so that one takes over within `lease_ttl_ms` of the holder's death.
        let pause = tokio::time::sleep(if learner {
            schedule.renew_every
        } else {
            schedule.poll_every
        });
        if learner != was_learner {
            info!(replica = %replica, learner, "learner lease {}", if learner { "taken" } else { "lost" });
            // A new learner counts its intervals from now.
            last_snapshot = tokio::time::Instant::now();
            last_refit = last_snapshot;
            was_learner = learner;
            next_duties = tokio::time::Instant::now();
        }
        if tokio::time::Instant::now() < next_duties {
            metrics.learner.set(i64::from(learner));
            pause.await;
            continue;
        }
        next_duties = tokio::time::Instant::now() + schedule.renew_every;
        metrics.learner.set(i64::from(learner));
        if shared && let Err(err) = engine.follow_rollbacks().await {
            metrics
                .backend_errors
                .with_label_values(&["rollbacks"])
                .inc();
            warn!(error = %err, "checking for rollbacks failed");
        }
        match engine.check_quality(&replica, learner).await {
            Ok(Some((decision, v))) => {
                metrics.rollbacks.with_label_values(&["auto"]).inc();
                warn!(
                    version = v.id,
                    to = decision.to,
                    reason = %v.reason,
                    "automatic rollback: model quality dropped"
                );
            }
            Ok(None) => {}
            Err(err) => {
                metrics
                    .backend_errors
                    .with_label_values(&["auto_rollback"])
                    .inc();
                warn!(error = %err, "automatic rollback failed");
            }
        }
        metrics.record_quality(&engine.quality());
        if learner && !snapshot_every.is_zero() && last_snapshot.elapsed() >= snapshot_every {
            last_snapshot = tokio::time::Instant::now();
            match engine.snapshot("scheduled", &replica).await {
                Ok(v) => {
                    metrics.snapshots.with_label_values(&["scheduled"]).inc();
                    info!(version = v.id, bytes = v.bytes, "scheduled snapshot saved");
                    if let Err(err) = engine.prune_versions(versions.keep).await {
                        warn!(error = %err, "pruning model versions failed");
                    }
                }
                Err(err) => {
                    metrics
                        .backend_errors
                        .with_label_values(&["snapshot"])
                        .inc();
                    warn!(error = %err, "scheduled snapshot failed");
                }
            }
        }
        let idle = refitting.as_ref().is_none_or(|task| task.is_finished());
        if learner && idle && !refit_every.is_zero() && last_refit.elapsed() >= refit_every {
            last_refit = tokio::time::Instant::now();
            let (refitter, metrics, replica) = (refitter.clone(), metrics.clone(), replica.clone());
            refitting = Some(tokio::spawn(async move {
                let outcome = match refitter.run(false, false, &replica).await {
                    Ok(report) => report.outcome.label(),
                    Err(err) => {
                        warn!(error = %format!("{err:#}"), "scheduled refit failed");
                        "failed"
                    }
                };
                metrics.refits.with_label_values(&[outcome]).inc();
            }));
        }
        pause.await;
    }
}

/// When the learner lease is written and checked, for a `versions.lease_ttl_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LeaseSchedule {
    /// How long a written lease lasts: `lease_ttl_ms` less one check interval, so that
    /// a holder that dies just after renewing is replaced within `lease_ttl_ms`.
    lifetime_ms: u64,
    /// How often the holder renews it: every third of its lifetime, so two renewals may
    /// fail before it lapses.
    renew_every: Duration,
    /// How often a replica that does not hold it tries to take it: a twentieth of the ttl.
    poll_every: Duration,
}

impl LeaseSchedule {
    fn for_ttl(ttl_ms: u64) -> Self {
        let poll_ms = (ttl_ms / 20).max(1);
        let lifetime_ms = ttl_ms.saturating_sub(poll_ms).max(1);
        Self {
            lifetime_ms,
            renew_every: Duration::from_millis((lifetime_ms / 3).max(1)),
            poll_every: Duration::from_millis(poll_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LeaseSchedule;

    /// Issue 14: takeover took up to 10.33 s with `lease_ttl_ms` = 10 s. The worst case is
    /// a holder dying right after renewing: its lease lasts `lifetime_ms`, and a waiting
    /// replica's next check comes at most `poll_every` later.
    #[test]
    fn a_dead_learner_is_replaced_within_the_lease_ttl() {
        for ttl in [30, 600, 10_000, 60_000] {
            let s = LeaseSchedule::for_ttl(ttl);
            let takeover = s.lifetime_ms + s.poll_every.as_millis() as u64;
            assert!(takeover <= ttl, "ttl {ttl}: taken over after {takeover} ms");
            assert!(
                s.renew_every.as_millis() as u64 * 3 <= s.lifetime_ms,
                "ttl {ttl}: {s:?} renews thrice per lifetime"
            );
        }
    }
}
