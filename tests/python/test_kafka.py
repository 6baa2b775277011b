"""The test environment's Kafka cluster (tests/env/kafka-up.sh: three KRaft brokers, each also
a controller) as exactly-once sinks and sources need it: transactions that commit and abort
while a broker shuts down, read_committed consumers that see every committed record once and
no aborted one, and the broker back in the cluster afterwards.

The broker that is stopped is the transaction coordinator of the producer that commits, so
its commit goes through a coordinator that moved in the middle of its transaction."""
import os
import secrets
import subprocess
import time

import pytest
from confluent_kafka import (OFFSET_BEGINNING, Consumer, ElectionType, KafkaError, KafkaException,
                             Producer, TopicPartition)
from confluent_kafka.admin import AdminClient

from conftest import REPO

KAFKA_SH = REPO / "tests" / "env" / "kafka.sh"
PARTITIONS = 6
COMMITTED = 100_000  # records committed before the broker stops
TXNS = 10  # in this many transactions
CHUNK = 2_000  # records each producer sends per chunk while the broker stops
T = 60  # seconds a step may take


def kafka_setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: this test runs against the test environment's Kafka cluster. "
            "Run `tests/env/kafka-up.sh DIR` and `source DIR/kafka.env` first "
            "(or `make env-up` and `source target/testenv/env.sh`, where it starts Kafka too)."
        )
    return value


@pytest.fixture(scope="module")
def bootstrap() -> str:
    return kafka_setting("WEIR_TEST_KAFKA")


@pytest.fixture(scope="module")
def broker_ids() -> list[int]:
    return sorted(int(i) for i in kafka_setting("WEIR_TEST_KAFKA_BROKER_IDS").split(","))


def kafka_sh(*args: str, stdin: str | None = None, timeout: float = 180) -> str:
    r = subprocess.run(["bash", str(KAFKA_SH), *args], capture_output=True, text=True,
                       input=stdin, timeout=timeout)
    assert r.returncode == 0, f"kafka.sh {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
    return r.stdout


def live_brokers() -> list[int]:
    return sorted(int(line) for line in kafka_sh("brokers").split())


def java_string_hash(s: str) -> int:
    """Java's String.hashCode (for ASCII), as a signed 32-bit int."""
    h = 0
    for c in s:
        h = (31 * h + ord(c)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def coordinator_of(admin: AdminClient, transactional_id: str) -> int:
    """The broker that coordinates a transactional id: the leader of its partition of
    __transaction_state, abs(id.hashCode()) % partitions, as Kafka's coordinator places it."""
    parts = admin.list_topics("__transaction_state", timeout=T).topics["__transaction_state"].partitions
    h = java_string_hash(transactional_id)
    p = (0 if h == -(1 << 31) else abs(h)) % len(parts)
    return parts[p].leader


def leaders(admin: AdminClient, topic: str) -> dict[int, int]:
    return {p: m.leader for p, m in admin.list_topics(topic, timeout=T).topics[topic].partitions.items()}


def transactional_producer(bootstrap: str, txn_id: str) -> Producer:
    p = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": txn_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "transaction.timeout.ms": 120_000,
        "message.timeout.ms": 100_000,
    })
    p.init_transactions(T)
    return p


def send(producer: Producer, topic: str, values: list[str]) -> None:
    for v in values:
        while True:
            try:
                producer.produce(topic, key=v.encode(), value=v.encode())
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(T)


def consume_all(bootstrap: str, topic: str, isolation: str, expected: int) -> list[str]:
    """Every value in the topic, as a consumer with this isolation level reads it from the
    beginning: until it has at least `expected` values and stands at the end of every
    partition, or T seconds have passed. For read_committed the end is the last stable offset;
    no transaction is open when the test reads, so nothing committed lies past it, and every
    aborted or duplicated record before it would be read (and fail the test)."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-kafka-{secrets.token_hex(4)}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    values: list[str] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + T
    try:
        while time.monotonic() < deadline:
            for m in c.consume(num_messages=5_000, timeout=0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                        continue
                    raise AssertionError(f"consuming {topic} ({isolation}): {m.error()}")
                at_end.discard(m.partition())
                values.append(m.value().decode())
            if len(values) >= expected and len(at_end) == PARTITIONS:
                break
    finally:
        c.close()
    return values


def check_exactly(values: list[str], committed: set[str], aborted: set[str], what: str) -> None:
    seen = set(values)
    dups = len(values) - len(seen)
    missing = committed - seen
    leaked = seen & aborted
    unknown = seen - committed - aborted
    assert not dups, f"{what}: {dups} committed records read more than once"
    assert not missing, f"{what}: {len(missing)} committed records missing, e.g. {sorted(missing)[:5]}"
    assert not leaked, f"{what}: {len(leaked)} aborted records read, e.g. {sorted(leaked)[:5]}"
    assert not unknown, f"{what}: {len(unknown)} records never produced, e.g. {sorted(unknown)[:5]}"
    assert len(values) == len(committed)


def test_transactions_across_a_broker_stop(bootstrap, broker_ids):
    started = time.monotonic()

    def phase(what):  # shown when the test fails (and with pytest -s)
        print(f"[{time.monotonic() - started:6.1f} s] {what}", flush=True)

    assert live_brokers() == broker_ids, "the cluster does not have all its brokers at the start"
    run = secrets.token_hex(4)
    topic = f"test-kafka-{run}"
    kafka_sh("create-topic", topic, str(PARTITIONS), "3")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    phase(f"topic {topic} created")

    # 1. 100,000 records in 10 committed transactions.
    first = [f"first-{i:06d}" for i in range(COMMITTED)]
    p0 = transactional_producer(bootstrap, f"test-kafka-{run}-first")
    step = COMMITTED // TXNS
    for t in range(TXNS):
        p0.begin_transaction()
        send(p0, topic, first[t * step:(t + 1) * step])
        p0.commit_transaction(T)
    phase(f"{COMMITTED} records committed in {TXNS} transactions")

    # 2. Two transactions open while a broker shuts down: one commits, the other aborts. The
    # broker stopped is the committing producer's transaction coordinator.
    ok = transactional_producer(bootstrap, f"test-kafka-{run}-commit")
    ab = transactional_producer(bootstrap, f"test-kafka-{run}-abort")
    victim = coordinator_of(admin, f"test-kafka-{run}-commit")
    assert victim in broker_ids, f"coordinator {victim} is none of the brokers {broker_ids}"
    ok_values: list[str] = []
    ab_values: list[str] = []

    def chunk():
        n = len(ok_values)
        ok_values.extend(f"commit-{i:06d}" for i in range(n, n + CHUNK))
        ab_values.extend(f"abort-{i:06d}" for i in range(n, n + CHUNK))
        send(ok, topic, ok_values[n:])
        send(ab, topic, ab_values[n:])

    phase(f"stopping broker {victim}, the committing producer's transaction coordinator")
    ok.begin_transaction()
    ab.begin_transaction()
    chunk()
    stopper = None
    try:
        stopper = subprocess.Popen(["bash", str(KAFKA_SH), "stop-broker", str(victim)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        during = 0
        while stopper.poll() is None and during < 20:
            chunk()
            during += 1
        out, _ = stopper.communicate(timeout=120)
        assert stopper.returncode == 0, f"stop-broker {victim} failed:\n{out}"
        assert during >= 1, "no records were sent while the broker was stopping"
        phase(f"broker {victim} stopped, {during} chunks sent while it stopped")
        chunk()  # and some after it is gone
        ok.commit_transaction(T)
        ab.abort_transaction(T)
        phase(f"{len(ok_values)} records committed, {len(ab_values)} aborted")
        assert victim not in live_brokers(), f"broker {victim} is still live after stop-broker"

        committed = set(first) | set(ok_values)
        aborted = set(ab_values)
        assert len(committed) == COMMITTED + len(ok_values) and not committed & aborted

        # 3. What readers see with the broker down.
        values = consume_all(bootstrap, topic, "read_committed", len(committed))
        check_exactly(values, committed, aborted, "read_committed with a broker down")
        phase("read_committed: exactly the committed records")
        # The abort did write its records: a read_uncommitted consumer sees them.
        everything = consume_all(bootstrap, topic, "read_uncommitted", len(committed) + len(aborted))
        assert aborted <= set(everything), \
            f"read_uncommitted misses {len(aborted - set(everything))} of the aborted records"
        assert committed <= set(everything)
        phase("read_uncommitted: the aborted records too")

        # 4. The broker back, leading its partitions again: what it serves is exactly the
        # committed records too.
        kafka_sh("start-broker", str(victim))
        assert live_brokers() == broker_ids
        phase(f"broker {victim} back")
        deadline = time.monotonic() + T
        while victim not in leaders(admin, topic).values():
            assert time.monotonic() < deadline, \
                f"broker {victim} leads no partition of {topic} again: {leaders(admin, topic)}"
            try:  # fails for the partitions whose replica on it has not caught up yet
                admin.elect_leaders(ElectionType.PREFERRED,
                                    [TopicPartition(topic, p) for p in range(PARTITIONS)]).result()
            except KafkaException:
                pass
            time.sleep(0.5)
        phase(f"broker {victim} leads partitions {sorted(p for p, b in leaders(admin, topic).items() if b == victim)}")
        values = consume_all(bootstrap, topic, "read_committed", len(committed))
        check_exactly(values, committed, aborted, "read_committed with the broker back")
        phase("read_committed: exactly the committed records")
    finally:
        # Other tests share the cluster: leave it with all its brokers.
        if stopper is not None and stopper.poll() is None:
            stopper.wait(120)
        if victim not in live_brokers():
            kafka_sh("start-broker", str(victim))
