//! Error types, one per domain. Tools and tests use anyhow on top.
use std::path::PathBuf;

use aya::{EbpfError, programs::ProgramError};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[source] EbpfError),
    #[error("the XDP object has no program `{0}`")]
    MissingProgram(String),
    #[error("program `{name}`: {source}{}", verifier_log(.source))]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinned map {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("map `{name}`: {reason}")]
    Map { name: String, reason: String },
}

impl DataplaneError {
    pub fn program(name: &str, source: ProgramError) -> Self {
        DataplaneError::Program {
            name: name.to_string(),
            source,
        }
    }

    pub fn map(name: &str, reason: impl std::fmt::Display) -> Self {
        DataplaneError::Map {
            name: name.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The verifier's log is the only useful part of a load failure: show its tail (and with
/// `LB_VERIFIER_LOG=<file>`, keep all of it there).
fn verifier_log(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            if let Some(path) = std::env::var_os("LB_VERIFIER_LOG") {
                let _ = std::fs::write(path, &log);
            }
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            format!(
                "\nverifier log (last {} lines):\n{}",
                tail.len(),
                tail.join("\n")
            )
        }
        _ => String::new(),
    }
}
