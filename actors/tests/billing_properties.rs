//! Property tests of metering: random sequences of starts, stops, ends,
//! ticks, control-plane crashes (the in-memory meters are lost and rebuilt
//! from what was written), retried writes and deposits, applied with the
//! same rules as the LedgerActor ([`corral_actors::billing`]). Whatever the
//! sequence:
//! - no instant of a sandbox is charged twice (periods never overlap, and a
//!   retried write is refused by its idempotency key);
//! - each sandbox is charged exactly its cost, rounded down to the
//!   micro-unit, for the time it was observed running (and kept stopped);
//! - the balance equals the sum of the entries.
//!
//! The write period is random too: charges not yet written are lost in a
//! crash and charged again from the last written period.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use corral_actors::billing::{self, Meter, MeterPhase, Plan, UsageCharge, PRICE_DENOMINATOR};
use corral_actors::domain::Resources;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Event {
    Start(usize),
    Stop(usize),
    End(usize),
    Tick,
    Crash,
    RetryLastWrite,
    Deposit(i64),
}

fn event() -> impl Strategy<Value = (u32, Event)> {
    let kind = prop_oneof![
        (0usize..3).prop_map(Event::Start),
        (0usize..3).prop_map(Event::Stop),
        (0usize..3).prop_map(Event::End),
        Just(Event::Tick),
        Just(Event::Tick),
        Just(Event::Crash),
        Just(Event::RetryLastWrite),
        (1i64..5_000).prop_map(Event::Deposit),
    ];
    // Milliseconds before the event.
    (0u32..20_000, kind)
}

struct Entry {
    key: String,
    sandbox: Option<usize>,
    period: Option<billing::Period>,
    amount: i64,
    carry: i64,
}

/// The ledger as the database holds it, and the meters as memory does.
struct Model {
    plan: Plan,
    /// How long a periodic charge's period grows before it is written.
    write_every: std::time::Duration,
    resources: [Resources; 3],
    entries: Vec<Entry>,
    keys: HashSet<String>,
    meters: HashMap<usize, Meter>,
    balance: i64,
    /// What each sandbox really does, and since when.
    truth: HashMap<usize, (MeterPhase, DateTime<Utc>)>,
    /// Exact cost of what each sandbox did, in fractions of a micro-unit.
    exact: HashMap<usize, i128>,
    last_write: Option<(usize, UsageCharge)>,
    /// Sandboxes that ended (destroyed): they never run again.
    ended: HashSet<usize>,
}

impl Model {
    fn write(&mut self, sandbox: usize, charge: &UsageCharge) -> bool {
        let key = charge.idempotency_key();
        if !self.keys.insert(key.clone()) {
            return false;
        }
        self.entries.push(Entry {
            key,
            sandbox: Some(sandbox),
            period: Some((charge.period_start, charge.period_end)),
            amount: -charge.micros,
            carry: charge.carry,
        });
        self.balance -= charge.micros;
        self.last_write = Some((sandbox, charge.clone()));
        true
    }

    /// The ledger's rule: charge the meter up to `at`, writing the charge if
    /// it closes a phase or its period is long enough and costs something.
    fn charge(&mut self, sandbox: usize, at: DateTime<Utc>, closes_phase: bool) {
        let Some(meter) = self.meters.get(&sandbox).cloned() else {
            return;
        };
        if let Some(charge) = meter.charge(&self.plan, at) {
            let written = billing::is_persisted(&charge, closes_phase, self.write_every);
            if written {
                self.write(sandbox, &charge);
            }
            if let Some(m) = self.meters.get_mut(&sandbox) {
                m.apply(&charge, written);
            }
        }
    }

    /// What really happened, for the exact expectation.
    fn account(&mut self, sandbox: usize, until: DateTime<Utc>) {
        if let Some((phase, since)) = self.truth.get(&sandbox).copied() {
            let ms = (until - since).num_milliseconds();
            *self.exact.entry(sandbox).or_default() +=
                self.plan.cost_fraction(phase, self.resources[sandbox], ms);
        }
    }

    fn change(&mut self, sandbox: usize, phase: Option<MeterPhase>, at: DateTime<Utc>) {
        if self.truth.get(&sandbox).map(|(p, _)| *p) == phase || self.ended.contains(&sandbox) {
            return;
        }
        if phase.is_none() {
            self.ended.insert(sandbox);
        }
        self.account(sandbox, at);
        match phase {
            Some(p) => self.truth.insert(sandbox, (p, at)),
            None => self.truth.remove(&sandbox),
        };
        if self.meters.contains_key(&sandbox) {
            self.charge(sandbox, at, true);
        }
        match phase {
            Some(p) => {
                let meter = self.meters.entry(sandbox).or_insert(Meter {
                    sandbox_id: format!("sbx_{sandbox}"),
                    resources: self.resources[sandbox],
                    phase: p,
                    billed_until: at,
                    written_until: at,
                    unwritten_micros: 0,
                    carry: 0,
                });
                meter.phase = p;
                if at > meter.billed_until {
                    meter.billed_until = at;
                    meter.written_until = at;
                }
            }
            None => {
                self.meters.remove(&sandbox);
            }
        }
    }

    /// A restart: meters are rebuilt from the rows (truth) and the last
    /// written period of each sandbox.
    fn crash(&mut self) {
        self.meters.clear();
        for (&sandbox, &(phase, since)) in &self.truth {
            let last = self
                .entries
                .iter()
                .filter(|e| e.sandbox == Some(sandbox))
                .filter_map(|e| e.period.map(|(_, end)| (end, e.carry)))
                .max_by_key(|(end, _)| *end);
            let (billed_until, carry) = billing::resume_point(last, since);
            self.meters.insert(
                sandbox,
                Meter {
                    sandbox_id: format!("sbx_{sandbox}"),
                    resources: self.resources[sandbox],
                    phase,
                    billed_until,
                    written_until: billed_until,
                    unwritten_micros: 0,
                    carry,
                },
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn metering_never_charges_twice_and_charges_exactly(
        events in proptest::collection::vec(event(), 1..80),
        cpu in proptest::array::uniform3(1u64..4000),
        mem in proptest::array::uniform3(1u64..8192),
        stopped_price in 0i64..5_000,
        write_every_ms in prop_oneof![Just(0u64), 1u64..60_000],
    ) {
        let plan = Plan {
            id: "p".into(),
            name: "p".into(),
            cpu_micros_per_vcpu_hour: 50_400,
            memory_micros_per_gib_hour: 16_200,
            stopped_memory_micros_per_gib_hour: stopped_price,
        };
        let resources = [0, 1, 2].map(|i| Resources { cpu_millis: cpu[i], memory_mb: mem[i] });
        let mut model = Model {
            plan,
            write_every: std::time::Duration::from_millis(write_every_ms),
            resources,
            entries: Vec::new(),
            keys: HashSet::new(),
            meters: HashMap::new(),
            balance: 0,
            truth: HashMap::new(),
            exact: HashMap::new(),
            last_write: None,
            ended: HashSet::new(),
        };
        let mut now = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap_or_default();
        for (pause, event) in events {
            now += Duration::milliseconds(i64::from(pause));
            match event {
                Event::Start(s) => model.change(s, Some(MeterPhase::Running), now),
                Event::Stop(s) => {
                    if model.truth.contains_key(&s) {
                        model.change(s, Some(MeterPhase::Stopped), now);
                    }
                }
                Event::End(s) => model.change(s, None, now),
                Event::Tick => {
                    let ids: Vec<usize> = model.meters.keys().copied().collect();
                    for s in ids {
                        model.charge(s, now, false);
                    }
                }
                Event::Crash => model.crash(),
                Event::RetryLastWrite => {
                    if let Some((s, charge)) = model.last_write.clone() {
                        prop_assert!(!model.write(s, &charge), "a retried write was applied twice");
                    }
                }
                Event::Deposit(amount) => {
                    let key = format!("deposit:{}", model.entries.len());
                    model.keys.insert(key.clone());
                    model.entries.push(Entry { key, sandbox: None, period: None, amount, carry: 0 });
                    model.balance += amount;
                }
            }
        }
        // Everything ends: each sandbox's last phase is closed.
        now += Duration::milliseconds(1);
        for s in 0..3 {
            if model.truth.contains_key(&s) {
                model.change(s, None, now);
            }
        }

        // The balance is the sum of the entries, and keys are unique.
        prop_assert_eq!(model.balance, model.entries.iter().map(|e| e.amount).sum::<i64>());
        prop_assert_eq!(model.keys.len(), model.entries.len());
        prop_assert!(model.entries.iter().all(|e| model.keys.contains(&e.key)));
        for s in 0..3 {
            let mut periods: Vec<billing::Period> = model
                .entries
                .iter()
                .filter(|e| e.sandbox == Some(s))
                .filter_map(|e| e.period)
                .collect();
            prop_assert_eq!(billing::overlapping(&mut periods), 0, "sandbox {} charged twice", s);
            // Written periods leave no gap: every metered instant is in one.
            for pair in periods.windows(2) {
                prop_assert!(pair[0].1 == pair[1].0,
                    "sandbox {} has a gap after {}", s, pair[0].1);
            }
            let charged: i64 = model
                .entries
                .iter()
                .filter(|e| e.sandbox == Some(s))
                .map(|e| -e.amount)
                .sum();
            let exact = model.exact.get(&s).copied().unwrap_or(0);
            let expected = i64::try_from(exact / PRICE_DENOMINATOR).unwrap_or(i64::MAX);
            prop_assert_eq!(charged, expected, "sandbox {} was charged {} for a cost of {}", s, charged, expected);
        }
    }
}
