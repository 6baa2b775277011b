//! `weir-controller`: the Weir operator. The reconcile loop is being built (issue 6).
fn main() {
    eprintln!("weir-controller: the reconcile loop is not built yet");
    std::process::exit(1);
}
