//! A user's `weir` binary: the built-in operator types and two of its own. It takes every
//! command and flag the stock `weir` takes (`weir-detector run job.yaml`, `coordinator`,
//! `worker`, ...), so its image runs in pods the way the stock image does.

use weir_detector::{FraudDetector, Transactions};
use weir_runtime::operator::Registry;

fn main() -> std::process::ExitCode {
    weir_runtime::main(
        Registry::builtin()
            .with::<Transactions>("transactions")
            .with::<FraudDetector>("fraud_detector"),
    )
}
