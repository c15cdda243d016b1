//! `lb-agent cleanup`: removes what an agent that exited with --keep-on-exit left behind: its
//! links (which detaches the programs), pinned maps, state file and saved drains.
use anyhow::{Context, Result};

use crate::{
    attach::{Attachments, UPLINK_TC_LINKS},
    cli::Paths,
    dataplane,
};

pub fn cleanup(paths: &Paths) -> Result<()> {
    let layout = dataplane::layout_dir(&paths.pin_dir);
    if let Ok(mut a) = Attachments::new(&layout) {
        a.detach_all();
    }
    if layout.join(UPLINK_TC_LINKS).exists()
        && let Ok(mut a) = Attachments::new_in(&layout, UPLINK_TC_LINKS)
    {
        a.detach_all();
    }
    if layout.exists() {
        std::fs::remove_dir_all(&layout)
            .with_context(|| format!("removing {}", layout.display()))?;
    }
    crate::state::remove(&paths.state_dir);
    let _ = std::fs::remove_file(crate::k8s::drains::path(&paths.state_dir));
    println!("removed {}", layout.display());
    Ok(())
}
