//! The CQL the Scylla backend runs: the schema, created or migrated at start-up, and the
//! statements it prepares once at connect. Every name is qualified with the keyspace, so
//! the session needs no `USE`.

/// Version of the schema these statements expect, recorded in `schema_version`.
pub(super) const SCHEMA_VERSION: i32 = 1;

/// Log records per partition of the `log` table (`bucket = seq / LOG_BUCKET`): large
/// enough that a page of records is one partition read, small enough that a partition
/// stays far below Scylla's large-partition warning (records are a few hundred bytes).
pub(super) const LOG_BUCKET: u64 = 10_000;

/// Name of the log's row in `sequences`.
pub(super) const LOG_SEQUENCE: &str = "log";

/// Name of the model version ids' row in `sequences`.
pub(super) const MODEL_SEQUENCE: &str = "models";

/// Bytes of a model snapshot per row of `model_chunks`: well under Scylla's large-cell
/// warning and any mutation size limit.
pub(super) const MODEL_CHUNK: usize = 512 * 1024;

/// `CREATE KEYSPACE IF NOT EXISTS` with the given replication map.
pub(super) fn create_keyspace(keyspace: &str, replication: &str) -> String {
    format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
}

/// Every table, in creation order, as `(name, CREATE TABLE IF NOT EXISTS …)`.
pub(super) fn create_tables(ks: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "schema_version",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.schema_version (\
                 component text PRIMARY KEY, version int, updated_ms bigint)"
            ),
        ),
        (
            "sequences",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.sequences (\
                 name text PRIMARY KEY, value bigint, owner bigint)"
            ),
        ),
        (
            "log",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.log (\
                 bucket bigint, seq bigint, ingested_ms bigint, record blob, \
                 PRIMARY KEY ((bucket), seq)) WITH CLUSTERING ORDER BY (seq ASC)"
            ),
        ),
        (
            "dedupe",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.dedupe (\
                 event_id text PRIMARY KEY, claimed_ms bigint, claim bigint)"
            ),
        ),
        (
            "profiles",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.profiles (\
                 user_id text PRIMARY KEY, \
                 version bigint, \
                 stamp bigint, \
                 stamps frozen<list<bigint>>, \
                 last_seen_ms bigint, \
                 touched_ms bigint, \
                 counts frozen<list<bigint>>, \
                 custom_counts frozen<list<frozen<tuple<text, bigint>>>>, \
                 recent frozen<list<frozen<tuple<text, text, bigint, float>>>>, \
                 purchased frozen<list<text>>, \
                 session frozen<tuple<text, bigint, bigint, bigint>>)"
            ),
        ),
        (
            "catalog",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.catalog (\
                 item_id text PRIMARY KEY, title text, categories frozen<list<text>>, \
                 available boolean, embedding frozen<list<float>>)"
            ),
        ),
        (
            "catalog_version",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.catalog_version (\
                 id int PRIMARY KEY, version counter)"
            ),
        ),
        (
            "model_versions",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.model_versions (\
                 id bigint PRIMARY KEY, meta blob)"
            ),
        ),
        (
            "model_chunks",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.model_chunks (\
                 id bigint, chunk int, data blob, \
                 PRIMARY KEY ((id), chunk)) WITH CLUSTERING ORDER BY (chunk ASC)"
            ),
        ),
        (
            "rollbacks",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.rollbacks (\
                 name text PRIMARY KEY, generation bigint, version bigint)"
            ),
        ),
        (
            "leases",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.leases (\
                 name text PRIMARY KEY, holder text, expires_ms bigint)"
            ),
        ),
    ]
}

/// Reads the recorded schema version.
pub(super) fn select_schema_version(ks: &str) -> String {
    format!("SELECT version FROM {ks}.schema_version WHERE component = 'reflex'")
}

/// Records the schema version the first time (bind: version, updated ms).
pub(super) fn insert_schema_version(ks: &str) -> String {
    format!(
        "INSERT INTO {ks}.schema_version (component, version, updated_ms) \
         VALUES ('reflex', ?, ?) IF NOT EXISTS"
    )
}

/// Moves the recorded schema version on after a migration (bind: new, updated ms, old).
pub(super) fn update_schema_version(ks: &str) -> String {
    format!(
        "UPDATE {ks}.schema_version SET version = ?, updated_ms = ? \
         WHERE component = 'reflex' IF version = ?"
    )
}

/// The profile columns in the order [`super::rows::ProfileRow`] binds them after the
/// user id.
pub(super) const PROFILE_COLUMNS: [&str; 10] = [
    "version",
    "stamp",
    "stamps",
    "last_seen_ms",
    "touched_ms",
    "counts",
    "custom_counts",
    "recent",
    "purchased",
    "session",
];

/// Every statement the store prepares at connect.
#[derive(Debug)]
pub(super) struct Statements {
    /// bind: name → (value, owner)
    pub select_sequence: String,
    /// bind: name, value, owner
    pub insert_sequence: String,
    /// bind: value, owner, name, expected value
    pub advance_sequence: String,
    /// bind: bucket, seq, ingested ms, record
    pub insert_log: String,
    /// bind: bucket, first seq, limit → (seq, record, written µs)
    pub select_log: String,
    /// bind: event id, claimed ms, claim, ttl s
    pub claim_dedupe: String,
    /// bind: ttl s, claimed ms, claim, event id, expected claimed ms
    pub reclaim_dedupe: String,
    /// bind: event id, claim
    pub release_dedupe: String,
    /// bind: event id → (claimed ms, claim)
    pub select_dedupe: String,
    /// bind: user id → a profile row
    pub select_profile: String,
    /// bind: user id, the ten profile columns, ttl s
    pub insert_profile: String,
    /// bind: ttl s, the ten profile columns, user id, expected stamp
    pub update_profile: String,
    /// bind: user id, expected stamp
    pub expire_profile: String,
    /// bind: user id
    pub erase_profile: String,
    /// no binds → user ids
    pub scan_profiles: String,
    /// bind: item id, title, categories, available, embedding
    pub upsert_item: String,
    /// bind: item id → an item row
    pub select_item: String,
    /// bind: item id
    pub delete_item: String,
    /// no binds → item rows
    pub scan_items: String,
    /// no binds
    pub bump_catalog_version: String,
    /// no binds → version
    pub select_catalog_version: String,
    /// bind: id, meta
    pub insert_model_version: String,
    /// no binds → (id, meta)
    pub scan_model_versions: String,
    /// bind: id → meta
    pub select_model_version: String,
    /// bind: id
    pub delete_model_version: String,
    /// bind: id, chunk, data
    pub insert_model_chunk: String,
    /// bind: id → (chunk, data)
    pub select_model_chunks: String,
    /// bind: id
    pub delete_model_chunks: String,
    /// bind: name → (generation, version)
    pub select_rollbacks: String,
    /// bind: name, generation, version
    pub insert_rollbacks: String,
    /// bind: generation, version, name, expected generation
    pub advance_rollbacks: String,
    /// bind: name, holder, expires ms, ttl s
    pub claim_lease: String,
    /// bind: ttl s, holder, expires ms, name, expected holder, expected expiry
    pub take_lease: String,
    /// bind: name, holder
    pub release_lease: String,
}

impl Statements {
    /// The statements for tables in keyspace `ks`.
    pub(super) fn new(ks: &str) -> Self {
        let columns = PROFILE_COLUMNS.join(", ");
        let markers = vec!["?"; PROFILE_COLUMNS.len()].join(", ");
        let assignments: Vec<String> = PROFILE_COLUMNS.iter().map(|c| format!("{c} = ?")).collect();
        let item_columns = "item_id, title, categories, available, embedding";
        Self {
            select_sequence: format!("SELECT value, owner FROM {ks}.sequences WHERE name = ?"),
            insert_sequence: format!(
                "INSERT INTO {ks}.sequences (name, value, owner) VALUES (?, ?, ?) IF NOT EXISTS"
            ),
            advance_sequence: format!(
                "UPDATE {ks}.sequences SET value = ?, owner = ? WHERE name = ? IF value = ?"
            ),
            insert_log: format!(
                "INSERT INTO {ks}.log (bucket, seq, ingested_ms, record) VALUES (?, ?, ?, ?)"
            ),
            select_log: format!(
                "SELECT seq, record, WRITETIME(record) FROM {ks}.log \
                 WHERE bucket = ? AND seq >= ? ORDER BY seq ASC LIMIT ?"
            ),
            claim_dedupe: format!(
                "INSERT INTO {ks}.dedupe (event_id, claimed_ms, claim) VALUES (?, ?, ?) \
                 IF NOT EXISTS USING TTL ?"
            ),
            reclaim_dedupe: format!(
                "UPDATE {ks}.dedupe USING TTL ? SET claimed_ms = ?, claim = ? \
                 WHERE event_id = ? IF claimed_ms = ?"
            ),
            release_dedupe: format!("DELETE FROM {ks}.dedupe WHERE event_id = ? IF claim = ?"),
            select_dedupe: format!("SELECT claimed_ms, claim FROM {ks}.dedupe WHERE event_id = ?"),
            select_profile: format!(
                "SELECT user_id, {columns} FROM {ks}.profiles WHERE user_id = ?"
            ),
            insert_profile: format!(
                "INSERT INTO {ks}.profiles (user_id, {columns}) VALUES (?, {markers}) \
                 IF NOT EXISTS USING TTL ?"
            ),
            update_profile: format!(
                "UPDATE {ks}.profiles USING TTL ? SET {} WHERE user_id = ? IF stamp = ?",
                assignments.join(", ")
            ),
            expire_profile: format!("DELETE FROM {ks}.profiles WHERE user_id = ? IF stamp = ?"),
            erase_profile: format!("DELETE FROM {ks}.profiles WHERE user_id = ? IF EXISTS"),
            scan_profiles: format!("SELECT user_id FROM {ks}.profiles"),
            upsert_item: format!(
                "INSERT INTO {ks}.catalog ({item_columns}) VALUES (?, ?, ?, ?, ?)"
            ),
            select_item: format!("SELECT {item_columns} FROM {ks}.catalog WHERE item_id = ?"),
            delete_item: format!("DELETE FROM {ks}.catalog WHERE item_id = ?"),
            scan_items: format!("SELECT {item_columns} FROM {ks}.catalog"),
            bump_catalog_version: format!(
                "UPDATE {ks}.catalog_version SET version = version + 1 WHERE id = 0"
            ),
            select_catalog_version: format!(
                "SELECT version FROM {ks}.catalog_version WHERE id = 0"
            ),
            insert_model_version: format!(
                "INSERT INTO {ks}.model_versions (id, meta) VALUES (?, ?)"
            ),
            scan_model_versions: format!("SELECT id, meta FROM {ks}.model_versions"),
            select_model_version: format!("SELECT meta FROM {ks}.model_versions WHERE id = ?"),
            delete_model_version: format!("DELETE FROM {ks}.model_versions WHERE id = ?"),
            insert_model_chunk: format!(
                "INSERT INTO {ks}.model_chunks (id, chunk, data) VALUES (?, ?, ?)"
            ),
            select_model_chunks: format!(
                "SELECT chunk, data FROM {ks}.model_chunks WHERE id = ? ORDER BY chunk ASC"
            ),
            delete_model_chunks: format!("DELETE FROM {ks}.model_chunks WHERE id = ?"),
            select_rollbacks: format!(
                "SELECT generation, version FROM {ks}.rollbacks WHERE name = ?"
            ),
            insert_rollbacks: format!(
                "INSERT INTO {ks}.rollbacks (name, generation, version) VALUES (?, ?, ?) \
                 IF NOT EXISTS"
            ),
            advance_rollbacks: format!(
                "UPDATE {ks}.rollbacks SET generation = ?, version = ? WHERE name = ? \
                 IF generation = ?"
            ),
            claim_lease: format!(
                "INSERT INTO {ks}.leases (name, holder, expires_ms) VALUES (?, ?, ?) \
                 IF NOT EXISTS USING TTL ?"
            ),
            take_lease: format!(
                "UPDATE {ks}.leases USING TTL ? SET holder = ?, expires_ms = ? WHERE name = ? \
                 IF holder = ? AND expires_ms = ?"
            ),
            release_lease: format!("DELETE FROM {ks}.leases WHERE name = ? IF holder = ?"),
        }
    }

    /// Every statement, for tests.
    #[cfg(test)]
    pub(super) fn all(&self) -> Vec<&str> {
        vec![
            &self.select_sequence,
            &self.insert_sequence,
            &self.advance_sequence,
            &self.insert_log,
            &self.select_log,
            &self.claim_dedupe,
            &self.reclaim_dedupe,
            &self.release_dedupe,
            &self.select_dedupe,
            &self.select_profile,
            &self.insert_profile,
            &self.update_profile,
            &self.expire_profile,
            &self.erase_profile,
            &self.scan_profiles,
            &self.upsert_item,
            &self.select_item,
            &self.delete_item,
            &self.scan_items,
            &self.bump_catalog_version,
            &self.select_catalog_version,
            &self.insert_model_version,
            &self.scan_model_versions,
            &self.select_model_version,
            &self.delete_model_version,
            &self.insert_model_chunk,
            &self.select_model_chunks,
            &self.delete_model_chunks,
            &self.select_rollbacks,
            &self.insert_rollbacks,
            &self.advance_rollbacks,
            &self.claim_lease,
            &self.take_lease,
            &self.release_lease,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn keyspace_statement_embeds_the_replication_map() {
        let cql = create_keyspace(
            "shop",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        );
        assert_eq!(
            cql,
            "CREATE KEYSPACE IF NOT EXISTS shop WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    #[test]
    fn every_table_is_created_if_missing_with_its_primary_key() {
        let tables = create_tables("ks");
        let expected_keys = [
            ("schema_version", "component text PRIMARY KEY"),
            ("sequences", "name text PRIMARY KEY"),
            ("log", "PRIMARY KEY ((bucket), seq)"),
            ("dedupe", "event_id text PRIMARY KEY"),
            ("profiles", "user_id text PRIMARY KEY"),
            ("catalog", "item_id text PRIMARY KEY"),
            ("catalog_version", "id int PRIMARY KEY"),
            ("model_versions", "id bigint PRIMARY KEY"),
            ("model_chunks", "PRIMARY KEY ((id), chunk)"),
            ("rollbacks", "name text PRIMARY KEY"),
            ("leases", "name text PRIMARY KEY"),
        ];
        assert_eq!(tables.len(), expected_keys.len());
        for ((name, cql), (want, key)) in tables.iter().zip(expected_keys) {
            assert_eq!(*name, want);
            let cql = compact(cql);
            assert!(
                cql.starts_with(&format!("CREATE TABLE IF NOT EXISTS ks.{name} (")),
                "{cql}"
            );
            assert!(cql.contains(key), "{name} keyed by {key}: {cql}");
            assert_eq!(
                cql.matches('(').count(),
                cql.matches(')').count(),
                "balanced: {cql}"
            );
            assert_eq!(
                cql.matches('<').count(),
                cql.matches('>').count(),
                "balanced: {cql}"
            );
            assert_eq!(cql.matches("PRIMARY KEY").count(), 1, "{cql}");
        }
        let profiles = compact(&tables[4].1);
        for column in PROFILE_COLUMNS {
            assert!(
                profiles.contains(&format!(" {column} ")),
                "profiles has {column}"
            );
        }
        assert!(compact(&tables[6].1).contains("version counter"));
    }

    #[test]
    fn statements_are_qualified_and_carry_their_conditions_and_ttls() {
        let s = Statements::new("ks");
        for cql in s.all() {
            assert!(cql.contains(" ks."), "qualified: {cql}");
            assert!(!cql.contains("{"), "no unformatted placeholders: {cql}");
        }
        assert!(s.claim_dedupe.ends_with("IF NOT EXISTS USING TTL ?"));
        assert!(
            s.reclaim_dedupe.contains("USING TTL ?")
                && s.reclaim_dedupe.ends_with("IF claimed_ms = ?")
        );
        assert!(s.insert_profile.ends_with("IF NOT EXISTS USING TTL ?"));
        assert!(
            s.update_profile
                .starts_with("UPDATE ks.profiles USING TTL ? SET version = ?")
        );
        assert!(s.update_profile.ends_with("WHERE user_id = ? IF stamp = ?"));
        assert!(s.advance_sequence.ends_with("IF value = ?"));
        // Bind markers: the insert binds the user id, the ten columns and the TTL.
        assert_eq!(s.insert_profile.matches('?').count(), 12);
        assert_eq!(s.update_profile.matches('?').count(), 13);
        assert_eq!(s.insert_log.matches('?').count(), 4);
        assert_eq!(s.upsert_item.matches('?').count(), 5);
    }
}
