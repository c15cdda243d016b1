//! Drains that outlive the agent: the translator's draining backends and their deadlines, kept
//! in `<state dir>/drains.json` so that an agent restarted or upgraded in the middle of a drain
//! (the data path keeps the backend at weight 0 meanwhile) ends it on time and ends its flows.
//! Deadlines are saved as wall-clock times, since an `Instant` means nothing to another process.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{Draining, Translator};
use crate::model::Frontend;

pub const FILE: &str = "drains.json";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The drains in progress, as the translator has them: (frontend, backend, until, reset).
pub type DrainState = Vec<(Frontend, (IpAddr, u16), Instant, bool)>;

/// One drain as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDrain {
    pub frontend: Frontend,
    pub addr: IpAddr,
    pub port: u16,
    /// When the deregistration delay ends, in milliseconds since the Unix epoch.
    pub until_unix_ms: u64,
    /// End its flows with a RST.
    pub reset: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Translator {
    /// The drains in progress, their deadlines as wall-clock times (`now` and `wall` being the
    /// same moment).
    pub fn saved_drains(&self, now: Instant, wall: SystemTime) -> Vec<SavedDrain> {
        self.draining
            .iter()
            .map(|((frontend, (addr, port)), d)| SavedDrain {
                frontend: *frontend,
                addr: *addr,
                port: *port,
                until_unix_ms: unix_ms(wall + d.until.saturating_duration_since(now)),
                reset: d.reset,
            })
            .collect()
    }

    /// The drains in progress as they are (for telling whether they changed).
    /// When the first drain in progress runs out, if one is in progress.
    pub(super) fn next_drain_end(&self) -> Option<Instant> {
        self.draining.values().map(|d| d.until).min()
    }

    pub(super) fn drain_state(&self) -> DrainState {
        self.draining
            .iter()
            .map(|((f, b), d)| (*f, *b, d.until, d.reset))
            .collect()
    }

    /// Takes up drains a previous agent saved: each backend is draining through its frontend
    /// until its saved deadline (ended at the next translation if that has passed), unless the
    /// cluster has it as an endpoint again.
    pub fn restore(&mut self, saved: &[SavedDrain], now: Instant, wall: SystemTime) {
        let wall_ms = unix_ms(wall);
        for s in saved {
            let left = Duration::from_millis(s.until_unix_ms.saturating_sub(wall_ms));
            let backend = (s.addr, s.port);
            self.draining.insert(
                (s.frontend, backend),
                Draining {
                    until: now + left,
                    reset: s.reset,
                },
            );
            // As if the previous translation had it: the next one sees it gone and drains it.
            Arc::make_mut(self.previous.entry(s.frontend).or_default())
                .entry(backend)
                .or_insert(0);
        }
    }
}

/// The saved drains; none if there is no file (or it cannot be read, which is logged).
pub fn read(state_dir: &Path) -> Vec<SavedDrain> {
    let path = path(state_dir);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
            log::warn!(
                "{}: {e}; drains in progress are not taken up",
                path.display()
            );
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            log::warn!(
                "{}: {e}; drains in progress are not taken up",
                path.display()
            );
            Vec::new()
        }
    }
}

/// Writes atomically (a restart never reads half a file).
pub fn write(state_dir: &Path, drains: &[SavedDrain]) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(drains).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path(state_dir))
}
