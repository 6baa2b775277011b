//! Prints the CRDs as YAML (`make generate` writes them to crds/weir-crds.yaml), or with
//! `--markdown` the CRD reference generated from their schemas (docs/reference/crds.md).
fn main() {
    match std::env::args().nth(1).as_deref() {
        None => print!("{}", weir_crds::crds_yaml()),
        Some("--markdown") => print!("{}", weir_crds::reference::crds_markdown()),
        Some(other) => {
            eprintln!(
                "crdgen: unknown argument {other:?}: use no argument (CRD YAML) or --markdown"
            );
            std::process::exit(2);
        }
    }
}
