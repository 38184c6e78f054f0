//! Evaluation data: the one ratings reader (tab-separated `user item rating
//! timestamp(seconds)` after a header line, plain or gzip), users and items numbered
//! densely, and where the MovieLens files are.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::Path;

use crate::batch::open_lines;

/// One rating, with users and items numbered densely in order of first appearance in
/// the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rating {
    /// Dense user number.
    pub user: u32,
    /// Dense item number.
    pub item: u32,
    /// The rating as given.
    pub rating: f32,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A set of ratings read from a file.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// The ratings, in file order.
    pub ratings: Vec<Rating>,
    /// Distinct users.
    pub users: usize,
    /// Distinct items.
    pub items: usize,
    /// Each dense item number's id as written in the file.
    pub item_ids: Vec<String>,
}

fn bad(line: usize, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: {what}"))
}

/// Reads tab-separated `user item rating timestamp(seconds)` rows after one header line.
pub fn read_ratings_tsv(reader: impl BufRead) -> io::Result<Dataset> {
    let mut users: HashMap<String, u32> = HashMap::new();
    let mut items: HashMap<String, u32> = HashMap::new();
    let mut ratings = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if n == 0 || line.trim().is_empty() {
            continue;
        }
        let mut cols = line.trim_end_matches('\r').split('\t');
        let (Some(u), Some(i), Some(r), Some(t)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            return Err(bad(n + 1, "expected 4 tab-separated columns"));
        };
        let rating: f32 = r
            .trim()
            .parse()
            .map_err(|_| bad(n + 1, "rating is not a number"))?;
        let secs: f64 = t
            .trim()
            .parse()
            .map_err(|_| bad(n + 1, "timestamp is not a number"))?;
        let next_user = users.len() as u32;
        let user = *users.entry(u.trim().to_string()).or_insert(next_user);
        let next_item = items.len() as u32;
        let item = *items.entry(i.trim().to_string()).or_insert(next_item);
        ratings.push(Rating {
            user,
            item,
            rating,
            timestamp_ms: (secs * 1000.0) as i64,
        });
    }
    let mut item_ids = vec![String::new(); items.len()];
    for (id, idx) in items {
        item_ids[idx as usize] = id;
    }
    Ok(Dataset {
        ratings,
        users: users.len(),
        items: item_ids.len(),
        item_ids,
    })
}

/// Reads MovieLens 100K's `ml-100k.inter` (header
/// `user_id:token item_id:token rating:float timestamp:float`) with [`read_ratings_file`].
pub fn read_movielens_100k(path: &Path) -> io::Result<Dataset> {
    read_ratings_file(path)
}

/// Reads MovieLens 1M's `ratings_numeric.tsv.gz` (header
/// `user_id item_idx rating timestamp`, gzip) with [`read_ratings_file`].
pub fn read_movielens_1m(path: &Path) -> io::Result<Dataset> {
    read_ratings_file(path)
}

/// Reads a ratings file of either format: tab-separated `user item rating
/// timestamp(seconds)` after a header line, gzip-compressed or not (told by its first two
/// bytes, as [`open_lines`] does for `reflex train` and `reflex import`). Errors name the
/// file.
pub fn read_ratings_file(path: &Path) -> io::Result<Dataset> {
    let file = open_lines(path)?;
    read_ratings_tsv(file.reader)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// How a rating becomes a learning weight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Weighting {
    /// Every interaction is a positive of weight 1; ratings are ignored.
    #[default]
    Unit,
    /// Weight `rating / 3` (1 to 5 stars become 0.33 to 1.67).
    Rating,
}

impl Weighting {
    /// The learning weight of `rating`.
    pub fn weight(self, rating: f32) -> f32 {
        match self {
            Self::Unit => 1.0,
            Self::Rating => rating / 3.0,
        }
    }
}

/// MovieLens `"100k"` or `"1m"` from [`data_dir`], for the examples.
pub fn read_movielens(which: &str) -> io::Result<Dataset> {
    let dir = data_dir();
    match which {
        "1m" => read_movielens_1m(&dir.join("movielens-1m/ratings_numeric.tsv.gz")),
        "100k" => read_movielens_100k(&dir.join("movielens-100k/ml-100k.inter")),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown dataset {other:?}: 100k or 1m"),
        )),
    }
}

/// Where the evaluation data is: `REFLEX_DATA_DIR`, else `../shared/data` beside the
/// checkout, else the workplace's `/work/shared/data` (for checkouts made elsewhere, such
/// as a CI clone in /tmp). For the examples and tests; the data is never copied here.
pub fn data_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("REFLEX_DATA_DIR") {
        return dir.into();
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if beside.exists() {
        beside
    } else {
        "/work/shared/data".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_gzip_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = "user\titem\trating\ttimestamp\nu1\ti1\t5\t10\nu2\ti1\t3\t11\n";
        let plain = dir.path().join("r.tsv");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("r.tsv.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let d = read_ratings_file(p).unwrap();
            assert_eq!((d.ratings.len(), d.users, d.items), (2, 2, 1));
            assert_eq!(d.ratings[1].timestamp_ms, 11_000);
        }
        let err = read_ratings_file(&dir.path().join("missing.tsv")).unwrap_err();
        assert!(err.to_string().contains("missing.tsv"), "{err}");
    }
}
