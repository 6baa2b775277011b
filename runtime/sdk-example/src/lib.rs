//! Two operator types of a user's own, written against Weir's SDK
//! ([`weir_runtime::operator`]):
//!
//! - `transactions` reads lines `account,amount,time` into records (`account`, `amount`,
//!   `time` in milliseconds);
//! - `fraud_detector`, keyed by account, flags an amount far above the account's mean so
//!   far (once per account and amount), and an account that went silent (no transaction
//!   for `silence` of event time). It keeps the account's count and sum in a [`ValueState`],
//!   the amounts already flagged in a [`MapState`], and an event-time timer per account: state
//!   that Weir checkpoints, restores after a failure, and splits by key group when the job is
//!   rescaled. It counts the transactions it judged and the alerts it raised in metrics of
//!   its own (`weir_user_transactions`, `weir_user_alerts`).

use serde::{Deserialize, Serialize};
use weir_runtime::error::RuntimeError;
use weir_runtime::operator::metrics::Counter;
use weir_runtime::operator::{
    Context, FieldType, Info, InputFields, MapState, Output, Process, ValueState,
};
use weir_runtime::record::{Record, Value};

/// Parameters of `transactions`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransactionsParams {
    /// The text field that holds `account,amount,time`.
    #[serde(default = "default_line")]
    pub field: String,
}

fn default_line() -> String {
    "line".into()
}

/// Lines `account,amount,time` as records (`account` text, `amount` and `time` integers);
/// other lines are dropped (and counted).
#[derive(Debug)]
pub struct Transactions {
    field: usize,
}

impl Process for Transactions {
    type Params = TransactionsParams;

    fn plan(params: &Self::Params, input: InputFields<'_>) -> Result<Output, String> {
        input.position(&params.field, "field")?;
        Ok(Output::fields([
            ("account", FieldType::Text),
            ("amount", FieldType::Integer),
            ("time", FieldType::Integer),
        ]))
    }

    fn open(params: Self::Params, info: &Info) -> Result<Self, RuntimeError> {
        Ok(Self { field: info.field(&params.field).expect("checked by plan") })
    }

    fn process(&mut self, record: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let Value::Str(line) = &record[self.field] else {
            ctx.drop_record();
            return Ok(());
        };
        let mut parts = line.trim().split(',').map(str::trim);
        let (account, amount, time) = (parts.next(), parts.next(), parts.next());
        match (account, amount.map(str::parse::<i64>), time.map(str::parse::<i64>), parts.next()) {
            (Some(account), Some(Ok(amount)), Some(Ok(time)), None) if !account.is_empty() => {
                ctx.emit(vec![Value::str(account), Value::Int(amount), Value::Int(time)]);
            }
            _ => ctx.drop_record(),
        }
        Ok(())
    }
}

/// Parameters of `fraud_detector`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FraudParams {
    /// The field records are keyed by (the account).
    #[serde(default = "default_account")]
    pub key: String,
    /// The integer field of the amount.
    #[serde(default = "default_amount")]
    pub field: String,
    /// An amount above `factor` times the account's mean so far is flagged; above 1.
    pub factor: f64,
    /// Transactions an account must have had before its amounts are judged.
    #[serde(default = "default_history")]
    pub min_history: u64,
    /// The integer field of the event time, in milliseconds.
    #[serde(default = "default_time")]
    pub time_field: String,
    /// An account without a transaction for this long (event time) is flagged as silent.
    #[serde(default = "default_silence")]
    pub silence: weir_runtime::operator::Duration,
}

fn default_time() -> String {
    "time".into()
}
fn default_silence() -> weir_runtime::operator::Duration {
    "5s".parse().expect("a duration")
}

fn default_account() -> String {
    "account".into()
}
fn default_amount() -> String {
    "amount".into()
}
fn default_history() -> u64 {
    3
}

/// An account's transactions so far.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub count: u64,
    pub sum: i64,
}

/// Emits `account, spike, amount, mean` (the integer mean before it) when an amount is
/// above `factor` times the account's mean, after `minHistory` transactions, each amount of
/// an account at most once; and `account, silent, time, mean` when `silence` of event time
/// passed after a transaction of the account without another (`time` is when it did).
#[derive(Debug)]
pub struct FraudDetector {
    key: usize,
    amount: usize,
    time: usize,
    factor: f64,
    min_history: u64,
    silence_ms: i64,
    stats: ValueState<Stats>,
    flagged: MapState<i64, bool>,
    /// When the account's silence timer is due.
    silent_at: ValueState<i64>,
    transactions: Counter,
    alerts: Counter,
}

impl Process for FraudDetector {
    type Params = FraudParams;

    fn plan(params: &Self::Params, input: InputFields<'_>) -> Result<Output, String> {
        input.position(&params.key, "key")?;
        for (what, name) in [("field", &params.field), ("timeField", &params.time_field)] {
            let i = input.position(name, what)?;
            if !matches!(input.types[i], FieldType::Integer | FieldType::Any) {
                return Err(format!(
                    "{what} {name:?} holds {}: it must hold integers",
                    input.types[i].describe()
                ));
            }
        }
        if !(params.factor.is_finite() && params.factor > 1.0) {
            return Err(format!("factor {} must be a number above 1", params.factor));
        }
        if params.silence.is_zero() {
            return Err("silence must be more than 0s".into());
        }
        Ok(Output::fields([
            (params.key.as_str(), FieldType::Text),
            ("alert", FieldType::Text),
            ("value", FieldType::Integer),
            ("mean", FieldType::Integer),
        ])
        .keyed_by(&params.key))
    }

    fn open(params: Self::Params, info: &Info) -> Result<Self, RuntimeError> {
        let field = |name: &str| info.field(name).expect("checked by plan");
        Ok(Self {
            key: field(&params.key),
            amount: field(&params.field),
            time: field(&params.time_field),
            factor: params.factor,
            min_history: params.min_history,
            silence_ms: params.silence.as_millis_i64(),
            stats: ValueState::new("stats"),
            flagged: MapState::new("flagged"),
            silent_at: ValueState::new("silent_at"),
            transactions: info.metrics.counter("transactions")?,
            alerts: info.metrics.counter("alerts")?,
        })
    }

    fn process(&mut self, record: Record, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        let (Some(amount), Some(time)) = (record[self.amount].as_i64(), record[self.time].as_i64())
        else {
            ctx.drop_record();
            return Ok(());
        };
        self.transactions.inc();
        let mut stats = self.stats.get(ctx)?.unwrap_or_default();
        if stats.count >= self.min_history {
            let mean = stats.sum / stats.count as i64;
            if amount as f64 > self.factor * mean as f64
                && self.flagged.get(ctx, &amount)?.is_none()
            {
                self.flagged.insert(ctx, &amount, &true)?;
                self.alerts.inc();
                ctx.emit(vec![
                    record[self.key].clone(),
                    Value::str("spike"),
                    Value::Int(amount),
                    Value::Int(mean),
                ]);
            }
        }
        stats.count += 1;
        stats.sum = stats.sum.wrapping_add(amount);
        self.stats.set(ctx, &stats)?;
        // A silence timer per account, `silence` after its latest transaction: a transaction
        // within the silence moves it on; one after it leaves it to fire (the account was
        // silent, though the watermark has not passed it yet) and starts the next.
        let due = time.saturating_add(self.silence_ms);
        let current = self.silent_at.get(ctx)?;
        if current.is_none_or(|t| t < due) {
            if let Some(t) = current.filter(|&t| t >= time) {
                ctx.delete_event_timer(t)?;
            }
            ctx.register_event_timer(due)?;
            self.silent_at.set(ctx, &due)?;
        }
        Ok(())
    }

    fn on_timer(&mut self, ts: i64, ctx: &mut Context<'_>) -> Result<(), RuntimeError> {
        if self.silent_at.get(ctx)? == Some(ts) {
            self.silent_at.clear(ctx)?;
        }
        let stats = self.stats.get(ctx)?.unwrap_or_default();
        let mean = if stats.count == 0 { 0 } else { stats.sum / stats.count as i64 };
        let account = String::from_utf8_lossy(ctx.current_key().unwrap_or_default()).into_owned();
        self.alerts.inc();
        ctx.emit(vec![
            Value::str(&account),
            Value::str("silent"),
            Value::Int(ts),
            Value::Int(mean),
        ]);
        Ok(())
    }
}
