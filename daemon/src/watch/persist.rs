//! The list of watched repositories, in `<state_dir>/watched.json`, so watching survives a
//! daemon restart. It lives outside sled on purpose: the cache may be discarded at any time,
//! the user's choice of what to watch may not.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub(crate) const FILE_NAME: &str = "watched.json";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct WatchedFile {
    version: u32,
    repos: Vec<PathBuf>,
}

/// The persisted list; empty when there is none yet. An unreadable or foreign file is an
/// error, so the caller can say so instead of silently forgetting the user's repositories.
pub(crate) fn load(state_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let path = state_dir.join(FILE_NAME);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: WatchedFile =
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if file.version != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("version {} (this daemon writes {VERSION})", file.version),
        ));
    }
    Ok(file.repos)
}

/// Replace the list atomically (temp file in the same directory, then rename), so a crash
/// leaves the old list or the new one, never half of one.
pub(crate) fn save(state_dir: &Path, repos: &[PathBuf]) -> io::Result<()> {
    let file = WatchedFile {
        version: VERSION,
        repos: repos.to_vec(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    text.push(b'\n');
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, state_dir.join(FILE_NAME)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("load").is_empty());
        let repos = vec![PathBuf::from("/a/b"), PathBuf::from("/c d/é")];
        save(dir.path(), &repos).expect("save");
        assert_eq!(load(dir.path()).expect("load"), repos);
        std::fs::write(dir.path().join(FILE_NAME), "{not json").expect("write");
        assert!(load(dir.path()).is_err());
    }
}
