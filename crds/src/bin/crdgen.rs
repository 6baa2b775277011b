//! Prints the CRDs as YAML (`make generate` writes them to crds/weir.dev_crds.yaml).
fn main() {
    print!("{}", weir_crds::crds_yaml());
}
