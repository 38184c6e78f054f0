//! `reflex demo`: starts a server on the embedded store, then drives a synthetic shopping
//! session through a real gRPC client and prints how recommendations change.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use prost_types::Timestamp;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::Config;
use crate::proto;
use crate::proto::catalog_service_client::CatalogServiceClient;
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::recommend_service_client::RecommendServiceClient;

const CATEGORIES: [&str; 6] = ["shoes", "books", "kitchen", "toys", "garden", "audio"];
const ADJECTIVES: [&str; 10] = [
    "Classic", "Trail", "Compact", "Deluxe", "Eco", "Pro", "Mini", "Urban", "Vintage", "Smart",
];
const ITEMS_PER_CATEGORY: usize = 10;
const BACKGROUND_USERS: usize = 300;
/// The item that arrives in step 5.
const NEW_SHOE: &str = "shoes-new";
/// Length of the demo's content embeddings: one axis per category, two for variety.
pub const EMBEDDING_DIM: usize = CATEGORIES.len() + 2;

/// A synthetic content embedding: the item's category axis, plus a little per-item
/// variation, as an upstream text encoder would place similar products close together.
fn embedding(category: usize, n: usize) -> Vec<f32> {
    let mut e = vec![0.0; EMBEDDING_DIM];
    e[category] = 1.0;
    e[CATEGORIES.len() + n % 2] = 0.1 + 0.02 * n as f32;
    e
}

/// Runs the demo against a fresh server with `config` (the content model switched on
/// for the demo's embeddings unless configured) and returns when it is done, or with
/// `stay`, when the server is asked to stop (Ctrl-C) after it, so the console can be
/// browsed.
pub async fn run(mut config: Config, stay: bool) -> anyhow::Result<()> {
    if config.content.dim == 0 {
        config.content.dim = EMBEDDING_DIM;
    }
    if config.content.dim != EMBEDDING_DIM {
        bail!(
            "the demo's embeddings have {EMBEDDING_DIM} values; content.dim is {}",
            config.content.dim
        );
    }
    let console = config.console.enabled;
    let server = crate::app::InProcess::start(config).await?;
    let console = server
        .metrics_addr
        .filter(|_| console)
        .map(|addr| format!("http://{addr}/console/"));
    if let Some(url) = &console {
        println!("Console: {url} (live while the demo runs; `reflex demo --stay` keeps it up)");
    }
    let result = drive(&server.endpoint).await;
    if stay && result.is_ok() {
        if let Some(url) = &console {
            println!("\nThe server stays up: browse {url}#user/alice, Ctrl-C to stop.");
        }
        crate::app::shutdown_signal().await;
    }
    server.stop().await?;
    result
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn ago(ts: &Timestamp, secs: i64) -> Timestamp {
    Timestamp {
        seconds: ts.seconds - secs,
        nanos: ts.nanos,
    }
}

fn item_id(category: &str, n: usize) -> String {
    format!("{category}-{n:02}")
}

fn event(
    id: String,
    user: &str,
    item: &str,
    kind: proto::EventKind,
    ts: Timestamp,
) -> proto::Event {
    proto::Event {
        event_id: id,
        user_id: user.into(),
        item_id: item.into(),
        kind: kind as i32,
        timestamp: Some(ts),
        ..Default::default()
    }
}

/// A bidirectional ingest stream: send a batch, wait for its ack.
struct Ingest {
    tx: mpsc::Sender<proto::IngestRequest>,
    acks: tonic::Streaming<proto::IngestResponse>,
    sequence: u64,
}

impl Ingest {
    async fn open(channel: Channel) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(4);
        let acks = EventServiceClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .context("opening the event stream")?
            .into_inner();
        Ok(Self {
            tx,
            acks,
            sequence: 0,
        })
    }

    async fn send(&mut self, events: Vec<proto::Event>) -> anyhow::Result<proto::IngestResponse> {
        self.sequence += 1;
        self.tx
            .send(proto::IngestRequest {
                sequence: self.sequence,
                events,
            })
            .await
            .context("the server closed the event stream")?;
        let ack = self
            .acks
            .next()
            .await
            .context("the event stream ended without an ack")?
            .context("the server refused the batch")?;
        if ack.sequence != self.sequence {
            bail!(
                "ack for batch {} while waiting for {}",
                ack.sequence,
                self.sequence
            );
        }
        Ok(ack)
    }
}

async fn drive(endpoint: &str) -> anyhow::Result<()> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .context("building the endpoint")?
        .connect()
        .await
        .context("connecting to the demo server")?;
    println!("Reflex demo: server on {endpoint}, embedded store\n");

    // The catalog: six categories of ten items.
    let mut catalog = CatalogServiceClient::new(channel.clone());
    let mut titles = HashMap::new();
    let mut items = Vec::new();
    for (c, category) in CATEGORIES.into_iter().enumerate() {
        for (n, adjective) in ADJECTIVES.iter().enumerate().take(ITEMS_PER_CATEGORY) {
            let id = item_id(category, n);
            let title = format!("{adjective} {}", category.trim_end_matches('s'));
            titles.insert(id.clone(), (title.clone(), category));
            items.push(proto::Item {
                item_id: id,
                title,
                categories: vec![category.into()],
                available: Some(true),
                embedding: embedding(c, n),
            });
        }
    }
    let n_items = items.len();
    // Step 5's new item, named here so results can show its title.
    titles.insert(NEW_SHOE.to_owned(), ("Launch shoe".to_owned(), "shoes"));
    catalog
        .upsert_items(proto::UpsertItemsRequest { items })
        .await
        .context("upserting the catalog")?;
    println!(
        "1. Catalog: upserted {n_items} items in {} categories, each with a content embedding.",
        CATEGORIES.len()
    );

    // Background shoppers, each loyal to one category, so the model learns the structure.
    let mut rng = StdRng::seed_from_u64(7);
    let mut ingest = Ingest::open(channel.clone()).await?;
    let start = now();
    let mut batch = Vec::new();
    let mut sent = 0usize;
    for u in 0..BACKGROUND_USERS {
        let user = format!("shopper-{u}");
        let favourite = CATEGORIES[u % CATEGORIES.len()];
        for e in 0..24 {
            let category = if rng.random_bool(0.85) {
                favourite
            } else {
                CATEGORIES[rng.random_range(0..CATEGORIES.len())]
            };
            // Popularity within a category is skewed: low numbers sell more.
            let n = (rng.random_range(0.0f64..1.0).powi(2) * ITEMS_PER_CATEGORY as f64) as usize;
            let kind = match rng.random_range(0..10) {
                0..=5 => proto::EventKind::View,
                6 | 7 => proto::EventKind::Click,
                8 => proto::EventKind::AddToCart,
                _ => proto::EventKind::Purchase,
            };
            let ts = ago(&start, 3600 - (e as i64) * 60);
            batch.push(event(
                format!("bg-{u}-{e}"),
                &user,
                &item_id(category, n),
                kind,
                ts,
            ));
            if batch.len() == 500 {
                sent += ingest.send(std::mem::take(&mut batch)).await?.accepted as usize;
            }
        }
    }
    if !batch.is_empty() {
        sent += ingest.send(batch).await?.accepted as usize;
    }
    println!(
        "2. Background: {BACKGROUND_USERS} shoppers sent {sent} events over one bidirectional stream (batches of 500), all accepted.\n"
    );

    let recommend = RecommendServiceClient::new(channel.clone());
    let top_n = |user: &'static str, count: u32| {
        let mut client = recommend.clone();
        async move {
            let resp = client
                .recommend(proto::RecommendRequest {
                    user_id: user.into(),
                    count,
                    filter: None,
                })
                .await
                .context("calling Recommend")?
                .into_inner();
            anyhow::Ok(resp)
        }
    };
    let top = |user: &'static str| top_n(user, 5);
    let show = |label: &str, resp: &proto::RecommendResponse, before: &[String]| {
        println!(
            "   {label} (profile v{}, model {}):",
            resp.profile_version, resp.model_version
        );
        for (rank, item) in resp.items.iter().enumerate() {
            let (title, category) = titles
                .get(&item.item_id)
                .map(|(t, c)| (t.as_str(), *c))
                .unwrap_or(("?", "?"));
            let source = proto::Source::try_from(item.source)
                .map(|s| s.as_str_name().trim_start_matches("SOURCE_").to_lowercase())
                .unwrap_or_default();
            let marker = if before.contains(&item.item_id) {
                ""
            } else {
                "  <- new"
            };
            println!(
                "     {}. {:<10} {:<16} [{category}] score {:>6.3} via {source}{marker}",
                rank + 1,
                item.item_id,
                title,
                item.score
            );
        }
    };
    let ids = |resp: &proto::RecommendResponse| -> Vec<String> {
        resp.items.iter().map(|i| i.item_id.clone()).collect()
    };
    let in_category = |resp: &proto::RecommendResponse, category: &str| {
        resp.items
            .iter()
            .filter(|i| i.item_id.starts_with(category))
            .count()
    };

    let bob_before = top("shopper-2").await?;
    println!("3. A new visitor, alice, arrives. Before any event of hers:");
    let mut last = top("alice").await?;
    show("alice", &last, &[]);
    println!();

    let session: [(proto::EventKind, &str); 5] = [
        (proto::EventKind::View, "shoes-03"),
        (proto::EventKind::Click, "shoes-03"),
        (proto::EventKind::View, "shoes-07"),
        (proto::EventKind::AddToCart, "shoes-07"),
        (proto::EventKind::Purchase, "shoes-07"),
    ];
    println!("4. alice shops for shoes; after each ack, the next Recommend already reflects it:");
    let mut purchase_event = None;
    for (step, (kind, item)) in session.iter().enumerate() {
        let e = event(format!("alice-{step}"), "alice", item, *kind, now());
        if *kind == proto::EventKind::Purchase {
            purchase_event = Some(e.clone());
        }
        let ack = ingest.send(vec![e]).await?;
        let status = ack
            .results
            .first()
            .and_then(|r| proto::EventStatus::try_from(r.status).ok())
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        println!(
            "\n   sent {} {item} -> {status}",
            kind.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_lowercase()
        );
        let before = ids(&last);
        last = top("alice").await?;
        show("alice now", &last, &before);
    }
    let shoes = in_category(&last, "shoes");
    println!(
        "\n   {shoes} of alice's top 5 are shoes now; the shoe she bought (shoes-07) is excluded."
    );

    let new_shoe = NEW_SHOE;
    catalog
        .upsert_items(proto::UpsertItemsRequest {
            items: vec![proto::Item {
                item_id: new_shoe.into(),
                title: "Launch shoe".into(),
                categories: vec!["shoes".into()],
                available: Some(true),
                embedding: embedding(0, ITEMS_PER_CATEGORY),
            }],
        })
        .await
        .context("upserting the new item")?;
    println!(
        "\n5. A new shoe ({new_shoe}) enters the catalog with its embedding; nobody has seen it yet:"
    );
    let before = ids(&last);
    let ten = top_n("alice", 10).await?;
    show("alice's top 10", &ten, &before);
    let via_content = ten
        .items
        .iter()
        .find(|i| i.item_id == new_shoe)
        .is_some_and(|i| i.source == proto::Source::Content as i32);
    println!(
        "\n   {}",
        if via_content {
            "The new shoe is recommended by the content model before its first event (cold start)."
        } else {
            "The new shoe is not in her top 10 (the shoes MF knows score higher)."
        }
    );

    let bob_after = top("shopper-2").await?;
    println!(
        "\n6. Another user (shopper-2, a kitchen fan) is untouched: {} before, {} after: {}.",
        bob_before.profile_version,
        bob_after.profile_version,
        if ids(&bob_before) == ids(&bob_after) {
            "same recommendations"
        } else {
            "recommendations drifted with the shared model"
        }
    );

    println!("\n7. Every status kind, in one batch:");
    let mut batch = Vec::new();
    if let Some(p) = purchase_event {
        batch.push(p);
    }
    batch.push(event(
        "bad-1".into(),
        "",
        "shoes-01",
        proto::EventKind::View,
        now(),
    ));
    let mut bot = event(
        "bot-1".into(),
        "crawler-9",
        "shoes-01",
        proto::EventKind::View,
        now(),
    );
    bot.context
        .insert("user_agent".into(), "ExampleBot/1.0".into());
    batch.push(bot);
    batch.push(event(
        "fresh-1".into(),
        "carol",
        "books-01",
        proto::EventKind::View,
        now(),
    ));
    let ack = ingest.send(batch).await?;
    for r in &ack.results {
        let status = proto::EventStatus::try_from(r.status)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        let reason = if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        };
        println!("   {:<10} {status}{reason}", r.event_id);
    }
    println!(
        "\nDone: {} accepted, {} duplicate, {} rejected, {} filtered in the last batch.",
        ack.accepted, ack.duplicate, ack.rejected, ack.filtered
    );
    Ok(())
}
