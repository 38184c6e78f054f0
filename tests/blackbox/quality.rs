//! What a shop gets: real grocery purchases replayed through the gRPC API of the real
//! binary, then `Recommend` for every shopper, scored against their held-out last
//! order. The figure must agree with what `reflex eval --protocol next-basket` reports
//! for the served ranking, and beat the "buy it again" list every shop already has;
//! after a refit (which gives the signals fitted item-to-item weights) it must agree
//! with `reflex eval --refit`.

use prost_types::Timestamp;
use reflex_models::eval::protocol::{Protocol, Split, score};
use reflex_models::eval::{data_dir, read_ratings_file};
use reflex_server::proto;
use reflex_server::proto::catalog_service_client::CatalogServiceClient;
use reflex_server::proto::model_service_client::ModelServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;
use reflex_server::served_eval::user_id;

use crate::support::*;

/// `profiles.session_gap_ms` by default: the basket gap the server and `reflex eval` use.
const BASKET_GAP_MS: i64 = 30 * 60 * 1000;

/// Both the server and `reflex eval` run with these: the per-user rate limit off, as for
/// an import, and a smaller item-to-item fit than the default 2,000 items (the test build
/// is barely optimised, and the fit is cubic in the items).
const ENV: [(&str, &str); 2] = [
    (
        "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
        "0",
    ),
    ("REFLEX_REFIT__ITEM_ITEM__ITEMS", "500"),
];

/// `reflex eval --protocol next-basket` on `path` (small ALS: its figure is not
/// compared here), in its own process, with `extra` arguments.
fn reflex_eval(path: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(["eval", "--protocol", "next-basket", "--json"])
        .args(["--factors", "8", "--iterations", "2"])
        .args(extra)
        .arg("--data")
        .arg(path)
        .envs(ENV)
        .env("RUST_LOG", "warn")
        .env_remove("REFLEX_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reflex eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn figure(json: &serde_json::Value, system: &str) -> f64 {
    json["systems"]
        .as_array()
        .and_then(|systems| systems.iter().find(|s| s["system"] == system))
        .and_then(|s| s["recall_at_10"].as_f64())
        .unwrap_or_else(|| panic!("no recall for {system:?} in {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_next_basket_figures_match_reflex_eval_and_beat_buy_it_again() {
    let path = data_dir().join("instacart-dev/interactions.tsv.gz");
    if !path.exists() {
        eprintln!(
            "SKIPPED: {} is absent (the evaluation data, see ../shared/data)",
            path.display()
        );
        return;
    }
    let data = read_ratings_file(&path).unwrap();
    let split = Split::new(&data, Protocol::NextBasket, BASKET_GAP_MS);
    let history = split.history(&data);

    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(dir.path(), &ENV);
    let channel = server.channel().await;
    let items: Vec<proto::Item> = data
        .item_ids
        .iter()
        .map(|id| proto::Item {
            item_id: id.clone(),
            available: Some(true),
            ..Default::default()
        })
        .collect();
    let mut catalog = CatalogServiceClient::new(channel.clone());
    for chunk in items.chunks(1000) {
        catalog
            .upsert_items(proto::UpsertItemsRequest {
                items: chunk.to_vec(),
            })
            .await
            .unwrap();
    }

    let mut stream = EventStream::open(channel.clone()).await;
    for chunk in split.train.chunks(500) {
        let events = chunk
            .iter()
            .map(|&i| {
                let r = data.ratings[i];
                event_at(
                    &format!("ev-{i}"),
                    &user_id(r.user),
                    &data.item_ids[r.item as usize],
                    proto::EventKind::Purchase,
                    Timestamp {
                        seconds: r.timestamp_ms.div_euclid(1000),
                        nanos: (r.timestamp_ms.rem_euclid(1000) * 1_000_000) as i32,
                    },
                )
            })
            .collect();
        let ack = stream.round_trip(events).await;
        assert!(
            statuses(&ack)
                .iter()
                .all(|s| *s == proto::EventStatus::Accepted),
            "every replayed purchase is accepted"
        );
    }
    stream.finish().await;

    let position = |id: &str| data.item_ids.iter().position(|x| x == id).map(|p| p as u32);
    let mut sources = std::collections::HashMap::<i32, usize>::new();
    let ask_everyone = async |sources: &mut std::collections::HashMap<i32, usize>| {
        let mut lists = Vec::with_capacity(split.targets.len());
        for target in &split.targets {
            let answer = recommend(&channel, &user_id(target.user), 10).await;
            for item in &answer.items {
                *sources.entry(item.source).or_default() += 1;
            }
            lists.push(
                answer
                    .items
                    .iter()
                    .filter_map(|s| position(&s.item_id))
                    .collect::<Vec<u32>>(),
            );
        }
        lists
    };
    let lists = ask_everyone(&mut sources).await;
    let served = score("served over gRPC", &split, &history, &lists);
    assert!(
        sources.contains_key(&(proto::Source::Repeat as i32)),
        "buy-again answers are credited to SOURCE_REPEAT: {sources:?}"
    );

    // "Bought together": what follows the most recommended item, from the same signals.
    let top = lists.iter().flatten().next().copied().unwrap();
    let together = RecommendServiceClient::new(channel.clone())
        .similar_items(proto::SimilarItemsRequest {
            item_id: data.item_ids[top as usize].clone(),
            count: 5,
            space: proto::SimilarSpace::Sequence as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!together.items.is_empty());
    assert!(
        together
            .items
            .iter()
            .all(|i| i.source == proto::Source::Sequence as i32)
    );

    // The offline evaluation of the served path, in its own process.
    let json = reflex_eval(&path, &[]);
    let offline = figure(&json, "Reflex, served");
    let buy_again = figure(&json, "personal frequency");
    eprintln!(
        "next-basket recall@10: gRPC {:.4}, reflex eval {offline:.4}, buy again {buy_again:.4}",
        served.recall_at_10
    );
    assert!(
        (served.recall_at_10 - offline).abs() <= 0.01,
        "the API answers as reflex eval measured: {} against {offline}",
        served.recall_at_10
    );
    assert!(
        served.recall_at_10 > buy_again * 1.03,
        "served {} does not beat buying again ({buy_again})",
        served.recall_at_10
    );

    // A refit over the API, as the learner runs on its schedule: whatever it decides
    // about ALS, it gives the signals item-to-item weights, and the answers change to
    // what `reflex eval --refit` measures.
    let refit = ModelServiceClient::new(channel.clone())
        .refit(proto::RefitRequest {
            install_anyway: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(refit.item_item_sources > 100, "{refit:?}");
    let refitted = score(
        "served over gRPC after a refit",
        &split,
        &history,
        &ask_everyone(&mut sources).await,
    );
    let offline_refit = figure(&reflex_eval(&path, &["--refit"]), "Reflex, served");
    eprintln!(
        "after a refit: gRPC {:.4}, reflex eval --refit {offline_refit:.4}",
        refitted.recall_at_10
    );
    assert!(
        (refitted.recall_at_10 - offline_refit).abs() <= 0.01,
        "after a refit the API answers as reflex eval --refit measured: {} against \
         {offline_refit}",
        refitted.recall_at_10
    );
    assert!(
        refitted.recall_at_10 != served.recall_at_10,
        "the fitted weights change the answers"
    );
}
