//! The synthetic e-commerce workload: a catalog, Zipf-distributed item popularity, and
//! users shopping in sessions that run a view → click → add_to_cart → purchase funnel.
//!
//! Everything is generated from a seed, so two runs with the same flags send the same
//! shape of traffic; event ids carry a per-run tag so a second run against the same
//! server is not answered `DUPLICATE`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost_types::Timestamp;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::proto;

/// Categories items are spread over, so category filters have something to bite on.
const CATEGORIES: usize = 24;

/// Shape of the traffic, shared by every generator of one run.
#[derive(Debug)]
pub struct Workload {
    /// Users in the returning population.
    pub users: usize,
    /// Share of sessions (and recommend calls) from users never seen before.
    pub new_user_share: f64,
    /// Share of events on items that are not in the initial catalog.
    pub new_item_share: f64,
    /// Tag that makes this run's event and user ids unique.
    pub run: String,
    /// Event ids are random UUIDs (as many clients send) rather than the run's tag and a
    /// counter, which sort in the order they are sent: a store that indexes ids sees no
    /// locality in them.
    pub random_event_ids: bool,
    zipf: Zipf,
}

impl Workload {
    /// A workload over `items` items (popularity Zipf with exponent `zipf_s`) and `users`
    /// returning users.
    pub fn new(
        items: usize,
        users: usize,
        zipf_s: f64,
        new_user_share: f64,
        new_item_share: f64,
        run: String,
    ) -> Self {
        Self {
            users,
            new_user_share,
            new_item_share,
            run,
            random_event_ids: false,
            zipf: Zipf::new(items.max(1), zipf_s),
        }
    }

    /// The same workload with random UUIDs as event ids (see [`Workload::random_event_ids`]).
    pub fn with_random_event_ids(mut self, random: bool) -> Self {
        self.random_event_ids = random;
        self
    }

    /// The id of catalog item `n` (0-based; 0 is the most popular).
    pub fn item_id(n: usize) -> String {
        format!("item-{n:07}")
    }

    /// The id of returning user `n`.
    pub fn user_id(n: usize) -> String {
        format!("user-{n:07}")
    }

    /// Catalog entries `range`.
    pub fn catalog(&self, range: std::ops::Range<usize>) -> Vec<proto::Item> {
        range
            .map(|n| proto::Item {
                item_id: Self::item_id(n),
                title: format!("Item {n}"),
                categories: vec![format!("cat-{:02}", n % CATEGORIES)],
                available: Some(true),
                embedding: vec![],
            })
            .collect()
    }

    /// A catalog item drawn by popularity.
    pub fn popular_item(&self, rng: &mut StdRng) -> usize {
        self.zipf.sample(rng)
    }

    /// A user for a recommend call: mostly returning users, sometimes an unknown one.
    pub fn recommend_user(&self, rng: &mut StdRng) -> String {
        if self.users == 0 || rng.random_bool(self.new_user_share) {
            format!("cold-{}-{}", self.run, rng.random_range(0..u64::MAX))
        } else {
            Self::user_id(rng.random_range(0..self.users))
        }
    }
}

/// A version-4 UUID in its usual text form, from 128 random bits.
fn uuid_v4(bits: u128) -> String {
    let bits = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    )
}

/// Zipf sampler over ranks `0..n` by inverse CDF (a binary search in the cumulative
/// weights), exact for any exponent; `n` up to a few million is cheap to set up.
#[derive(Debug)]
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cdf = (1..=n)
            .map(|rank| {
                total += (rank as f64).powf(-s);
                total
            })
            .collect();
        Self { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let total = self.cdf.last().copied().unwrap_or(0.0);
        let u = rng.random_range(0.0..1.0) * total;
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// Where a session is in the funnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Browsing,
    Clicked,
    InCart,
    Buying,
}

#[derive(Debug)]
struct Session {
    user: Arc<str>,
    stage: Stage,
    /// The item the funnel is on.
    item: Arc<str>,
    /// Views left before the user leaves without buying.
    views_left: u32,
}

/// Funnel probabilities: each step continues with this chance, else the user goes back
/// to browsing.
const P_CLICK: f64 = 0.25;
const P_CART: f64 = 0.3;
const P_BUY: f64 = 0.45;

/// Generates the events of many interleaved sessions: each event comes from a random
/// open session, so one user sends only a few events a second even at high total rates
/// (as real traffic does, and as the server's per-user bot rate limit expects).
pub struct SessionGen {
    workload: Arc<Workload>,
    rng: StdRng,
    sessions: Vec<Session>,
    /// Tag of this generator in ids.
    tag: String,
    next_event: u64,
    next_new_user: u64,
    next_new_item: u64,
    device: [&'static str; 3],
    /// Reused ids of catalog items, so a batch does not format each id again.
    item_ids: HashMap<usize, Arc<str>>,
}

impl SessionGen {
    /// A generator with `open_sessions` sessions in flight; `tag` keeps its ids apart
    /// from other generators'.
    pub fn new(workload: Arc<Workload>, open_sessions: usize, seed: u64, tag: String) -> Self {
        let mut generator = Self {
            workload,
            rng: StdRng::seed_from_u64(seed),
            sessions: Vec::new(),
            tag,
            next_event: 0,
            next_new_user: 0,
            next_new_item: 0,
            device: ["mobile", "desktop", "tablet"],
            item_ids: HashMap::new(),
        };
        generator.sessions = (0..open_sessions.max(1))
            .map(|_| generator.new_session())
            .collect();
        generator
    }

    fn item(&mut self) -> Arc<str> {
        let w = &self.workload;
        if w.new_item_share > 0.0 && self.rng.random_bool(w.new_item_share.min(1.0)) {
            self.next_new_item += 1;
            return Arc::from(format!("new-{}-{}-{}", w.run, self.tag, self.next_new_item));
        }
        let n = w.popular_item(&mut self.rng);
        self.item_ids
            .entry(n)
            .or_insert_with(|| Arc::from(Workload::item_id(n)))
            .clone()
    }

    fn new_session(&mut self) -> Session {
        let w = &self.workload;
        let user: Arc<str> = if w.users == 0 || self.rng.random_bool(w.new_user_share.min(1.0)) {
            self.next_new_user += 1;
            Arc::from(format!("new-{}-{}-{}", w.run, self.tag, self.next_new_user))
        } else {
            Arc::from(Workload::user_id(self.rng.random_range(0..w.users)))
        };
        // Geometric number of views, mean about 4.
        let mut views_left = 1;
        while views_left < 40 && self.rng.random_bool(0.75) {
            views_left += 1;
        }
        let item = self.item();
        Session {
            user,
            stage: Stage::Browsing,
            item,
            views_left,
        }
    }

    /// The next event of a random open session, at `ts`.
    pub fn next_event(&mut self, ts: Timestamp) -> proto::Event {
        let i = self.rng.random_range(0..self.sessions.len());
        let stage = self.sessions[i].stage;
        let (kind, next) = match stage {
            Stage::Browsing => {
                let item = self.item();
                let s = &mut self.sessions[i];
                s.item = item;
                s.views_left = s.views_left.saturating_sub(1);
                let next = if self.rng.random_bool(P_CLICK) {
                    Stage::Clicked
                } else {
                    Stage::Browsing
                };
                (proto::EventKind::View, next)
            }
            Stage::Clicked => (
                proto::EventKind::Click,
                if self.rng.random_bool(P_CART) {
                    Stage::InCart
                } else {
                    Stage::Browsing
                },
            ),
            Stage::InCart => (
                proto::EventKind::AddToCart,
                if self.rng.random_bool(P_BUY) {
                    Stage::Buying
                } else {
                    Stage::Browsing
                },
            ),
            Stage::Buying => (proto::EventKind::Purchase, Stage::Browsing),
        };
        let event = self.event(i, kind, ts);
        let done = kind == proto::EventKind::Purchase
            || (next == Stage::Browsing && self.sessions[i].views_left == 0);
        if done {
            self.sessions[i] = self.new_session();
        } else {
            self.sessions[i].stage = next;
        }
        event
    }

    fn event(&mut self, session: usize, kind: proto::EventKind, ts: Timestamp) -> proto::Event {
        self.next_event += 1;
        let s = &self.sessions[session];
        let mut context = BTreeMap::new();
        context.insert(
            "device".to_string(),
            self.device[(self.next_event % 3) as usize].to_string(),
        );
        context.insert("channel".to_string(), "web".to_string());
        let event_id = if self.workload.random_event_ids {
            uuid_v4(self.rng.random())
        } else {
            format!("{}-{}-{}", self.workload.run, self.tag, self.next_event)
        };
        proto::Event {
            event_id,
            user_id: s.user.to_string(),
            item_id: s.item.to_string(),
            kind: kind as i32,
            custom_kind: String::new(),
            weight: None,
            timestamp: Some(ts),
            session_id: String::new(),
            value: (kind == proto::EventKind::Purchase).then_some(19.99),
            context,
        }
    }

    /// A batch of `n` events, all at `ts`.
    pub fn batch(&mut self, n: usize, ts: Timestamp) -> Vec<proto::Event> {
        (0..n).map(|_| self.next_event(ts)).collect()
    }

    /// `n` events of returning user `user` (one shopping session), for seeding profiles.
    pub fn seed_user(&mut self, user: usize, n: usize, ts: Timestamp) -> Vec<proto::Event> {
        let id: Arc<str> = Arc::from(Workload::user_id(user));
        let item = self.item();
        self.sessions.push(Session {
            user: id,
            stage: Stage::Browsing,
            item,
            views_left: u32::MAX,
        });
        let slot = self.sessions.len() - 1;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let stage = self.sessions[slot].stage;
            let (kind, next) = match stage {
                Stage::Browsing => {
                    let item = self.item();
                    self.sessions[slot].item = item;
                    let next = if self.rng.random_bool(P_CLICK) {
                        Stage::Clicked
                    } else {
                        Stage::Browsing
                    };
                    (proto::EventKind::View, next)
                }
                Stage::Clicked => (proto::EventKind::Click, Stage::InCart),
                Stage::InCart => (proto::EventKind::AddToCart, Stage::Buying),
                Stage::Buying => (proto::EventKind::Purchase, Stage::Browsing),
            };
            out.push(self.event(slot, kind, ts));
            self.sessions[slot].stage = next;
        }
        self.sessions.pop();
        out
    }
}

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Arc<Workload> {
        Arc::new(Workload::new(1000, 500, 1.0, 0.1, 0.01, "t".into()))
    }

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let zipf = Zipf::new(1000, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            hits[zipf.sample(&mut rng)] += 1;
        }
        // Rank 1 carries 1/H(1000) ≈ 13% of the mass, rank 10 about 1.3%.
        assert!((11_000..15_000).contains(&hits[0]), "{}", hits[0]);
        assert!(hits[0] > 5 * hits[9] && hits[9] > hits[500]);
    }

    #[test]
    fn sessions_follow_the_funnel_with_unique_ids() {
        let mut generator = SessionGen::new(workload(), 50, 7, "s0".into());
        let events = generator.batch(20_000, now());
        let ids: std::collections::HashSet<&str> =
            events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), events.len());
        let count = |k: proto::EventKind| events.iter().filter(|e| e.kind == k as i32).count();
        let (views, clicks, carts, buys) = (
            count(proto::EventKind::View),
            count(proto::EventKind::Click),
            count(proto::EventKind::AddToCart),
            count(proto::EventKind::Purchase),
        );
        assert!(views > clicks && clicks > carts && carts > buys && buys > 0);
        let new_users = events
            .iter()
            .filter(|e| e.user_id.starts_with("new-"))
            .count();
        assert!(new_users > 0 && new_users < events.len() / 4);
    }

    #[test]
    fn random_event_ids_are_distinct_uuids() {
        let workload = Arc::new(
            Workload::new(1000, 500, 1.0, 0.1, 0.01, "t".into()).with_random_event_ids(true),
        );
        let mut generator = SessionGen::new(workload, 50, 7, "s0".into());
        let events = generator.batch(5_000, now());
        let ids: std::collections::HashSet<&str> =
            events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), events.len());
        for id in ids {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert_eq!(&id[14..15], "4", "{id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        }
    }

    #[test]
    fn seeding_gives_each_user_exactly_n_events() {
        let mut generator = SessionGen::new(workload(), 1, 7, "seed".into());
        let events = generator.seed_user(42, 5, now());
        assert_eq!(events.len(), 5);
        assert!(events.iter().all(|e| e.user_id == "user-0000042"));
        assert_eq!(events[0].kind, proto::EventKind::View as i32);
    }
}
