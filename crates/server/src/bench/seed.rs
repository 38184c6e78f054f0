//! Loading the catalog and seeding it: one event per item and a short history per
//! returning user, before the load starts.

use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt as _;
use tokio::task::JoinHandle;

use super::args::BenchArgs;
use super::drivers::{Conn, Target, send_all};
use super::progress;
use super::workload::{SessionGen, Workload, now};
use crate::proto;
use crate::proto::catalog_service_client::CatalogServiceClient;
use crate::proto::profile_service_client::ProfileServiceClient;

/// Items per `UpsertItems` call while loading the catalog.
const CATALOG_CHUNK: usize = 5_000;
/// Items each seeding user touches (under the default bot burst of 200, so seeding a
/// server with the filter on is not filtered).
const ITEMS_PER_SEED_USER: usize = 100;

/// Upserts the whole catalog of `workload` through `control`, in chunks.
pub(super) async fn catalog(
    args: &BenchArgs,
    control: &Conn,
    workload: &Workload,
) -> anyhow::Result<()> {
    let bar = progress(
        args.items as u64,
        "catalog {bar:40} {pos}/{len} items {per_sec}",
    );
    let mut catalog = CatalogServiceClient::new(control.clone()).max_decoding_message_size(1 << 26);
    for start in (0..args.items).step_by(CATALOG_CHUNK) {
        let end = (start + CATALOG_CHUNK).min(args.items);
        catalog
            .upsert_items(proto::UpsertItemsRequest {
                items: workload.catalog(start..end),
            })
            .await
            .map_err(|status| {
                let hint = auth_hint(&status, args.api_key.is_some());
                anyhow::Error::new(status)
                    .context(format!("upserting catalog items {start}..{end}{hint}"))
            })?;
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// What to do about a refusal by the server's API key check, the first call that needs a
/// key being the catalog upsert.
fn auth_hint(status: &tonic::Status, has_key: bool) -> &'static str {
    match status.code() {
        tonic::Code::Unauthenticated if has_key => " (the server does not know this API key)",
        tonic::Code::Unauthenticated => {
            " (the server requires an API key: pass --api-key or set REFLEX_BENCH_API_KEY)"
        }
        tonic::Code::PermissionDenied => {
            " (the API key needs the admin scope: the run loads the catalog and erases users)"
        }
        _ => "",
    }
}

/// One view of every catalog item, by users that touch [`ITEMS_PER_SEED_USER`] items
/// each; those users are erased afterwards so they do not count as users.
pub(super) async fn seed_items(
    args: &BenchArgs,
    target: &Target,
    workload: &Arc<Workload>,
) -> anyhow::Result<[u64; 4]> {
    let bar = progress(
        args.items as u64,
        "items  {bar:40} {pos}/{len} events {per_sec}",
    );
    let streams = args.streams.max(1);
    let per_stream = args.items.div_ceil(streams);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (start, end) = (s * per_stream, ((s + 1) * per_stream).min(args.items));
        let (workload, bar, batch) = (workload.clone(), bar.clone(), args.batch);
        let channel = target.connect().await?;
        let depth = args.depth;
        tasks.push(tokio::spawn(async move {
            let ts = now();
            let batches = (start..end).step_by(batch).map(move |b| {
                (b..(b + batch).min(end))
                    .map(|n| proto::Event {
                        event_id: format!("seed-{}-{n}", workload.run),
                        user_id: format!("seed-{}-{}", workload.run, n / ITEMS_PER_SEED_USER),
                        item_id: Workload::item_id(n),
                        kind: proto::EventKind::View as i32,
                        timestamp: Some(ts),
                        ..Default::default()
                    })
                    .collect()
            });
            send_all(channel, depth, batches, |n| bar.inc(n)).await
        }));
    }
    let totals = join_totals(tasks).await?;
    bar.finish_and_clear();
    let seed_users = args.items.div_ceil(ITEMS_PER_SEED_USER);
    let profiles = ProfileServiceClient::new(target.connect().await?);
    let run = workload.run.clone();
    let erased: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..seed_users)
        .map(|u| {
            let mut client = profiles.clone();
            let user_id = format!("seed-{run}-{u}");
            async move {
                client
                    .erase_profile(proto::EraseProfileRequest { user_id })
                    .await
                    .context("erasing a seeding user")?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    erased.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(totals)
}

/// `seed_events` events for every returning user.
pub(super) async fn seed_users(
    args: &BenchArgs,
    target: &Target,
    workload: &Arc<Workload>,
) -> anyhow::Result<[u64; 4]> {
    let total = (args.users * args.seed_events) as u64;
    let bar = progress(total, "users  {bar:40} {pos}/{len} events {per_sec}");
    let streams = args.streams.max(1);
    let per_stream = args.users.div_ceil(streams);
    let users_per_batch = (args.batch / args.seed_events).max(1);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (start, end) = (s * per_stream, ((s + 1) * per_stream).min(args.users));
        let mut generator = SessionGen::new(
            workload.clone(),
            1,
            args.seed.wrapping_add(1000 + s as u64),
            format!("seed{s}"),
        );
        let (bar, n) = (bar.clone(), args.seed_events);
        let channel = target.connect().await?;
        let depth = args.depth;
        tasks.push(tokio::spawn(async move {
            let batches = (start..end).step_by(users_per_batch).map(move |b| {
                let ts = now();
                (b..(b + users_per_batch).min(end))
                    .flat_map(|u| generator.seed_user(u, n, ts))
                    .collect::<Vec<_>>()
            });
            send_all(channel, depth, batches, |n| bar.inc(n)).await
        }));
    }
    let totals = join_totals(tasks).await?;
    bar.finish_and_clear();
    Ok(totals)
}

async fn join_totals(tasks: Vec<JoinHandle<anyhow::Result<[u64; 4]>>>) -> anyhow::Result<[u64; 4]> {
    let mut totals = [0u64; 4];
    for task in tasks {
        let part = task.await.context("joining a seeding task")??;
        for (t, p) in totals.iter_mut().zip(part) {
            *t += p;
        }
    }
    Ok(totals)
}
