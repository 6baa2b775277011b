//! The stock `weir` binary: the built-in operator types ([`weir_runtime::main`] is the whole
//! of it; a user's binary with operators of its own is the same line with more types).

fn main() -> std::process::ExitCode {
    weir_runtime::main(weir_runtime::operator::Registry::builtin())
}
