//! `liveclone crdgen`: the CustomResourceDefinitions of Kubernetes mode as
//! YAML, generated from the Rust types (`make crds` writes them into
//! `deploy/crds/` and the chart).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::k8s::crds;

#[derive(Debug, Args)]
pub struct CrdgenArgs {
    /// Write one file per CRD (`<plural>.liveclone.io.yaml`) into this
    /// folder, made if missing, instead of printing all of them to stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

pub fn run(args: CrdgenArgs) -> anyhow::Result<()> {
    let Some(dir) = args.out_dir else {
        super::emit(&crds::stream()?)?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in crds::files()? {
        let path = dir.join(&file.file_name);
        std::fs::write(&path, &file.yaml).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
