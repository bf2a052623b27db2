//! Placement: the pure decision of which host a sandbox goes to. No I/O and
//! no actor: the Scheduler owns the fleet's capacity view and the
//! reservations, and calls [`choose`] with them.
//!
//! A decision is a filter ([`feasible`]: state, pool, selector, runtime,
//! exclusions, free capacity) then a score ([`score`]: the image already on
//! the host, anti-affinity, then the `spread` or `binpack` strategy), with
//! ties going to the lowest host id so that a decision is reproducible.
//!
//! Fast with thousands of hosts without a full sort: up to
//! [`FULL_SCAN_BELOW`] hosts every host is scored; above it, hosts are
//! sampled at random until [`SAMPLE_FEASIBLE`] feasible ones were seen
//! (best-of-K; bounded number of probes) and the best of those wins. Only a
//! failed sample pays for a full scan, so "no capacity" is never a false
//! negative, and an org's private pool (few hosts, kept in an index) is
//! always scanned whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::domain::{Placement, PlacementStrategy, Resources};
use crate::error::CorralError;

/// Fleets up to this size are scanned whole on every decision.
pub const FULL_SCAN_BELOW: usize = 256;
/// Above [`FULL_SCAN_BELOW`], the best of this many feasible random hosts.
pub const SAMPLE_FEASIBLE: usize = 64;
/// Random probes per sampled decision before falling back to a full scan.
pub const SAMPLE_PROBES: usize = 4 * SAMPLE_FEASIBLE;

/// One host as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// What sandboxes may reserve on it: what the agent reported, less the
    /// configured reserve, times the overcommit ratio.
    pub allocatable: Resources,
    /// The sum of the reservations on it.
    pub allocated: Resources,
    /// Whether it takes new placements now: connected, and `active` for
    /// operators (not cordoned, draining or decommissioned).
    pub schedulable: bool,
    /// What the agent last reported in use (heartbeats).
    pub usage: Resources,
    /// Labels the agent reported.
    pub labels: BTreeMap<String, String>,
    /// The runtime kind (`runc`, `docker`, `process`, `fake`).
    pub runtime: String,
    /// Images the host holds.
    pub images: BTreeSet<String>,
    /// The org whose private pool it is in; `None` for the shared fleet.
    pub pool: Option<String>,
    /// Sandboxes holding a reservation on it.
    pub sandboxes: u32,
    /// Reservations per sandbox label (`key=value`), for anti-affinity.
    pub groups: HashMap<String, u32>,
}

impl HostCapacity {
    pub fn free(&self) -> Resources {
        Resources {
            cpu_millis: self
                .allocatable
                .cpu_millis
                .saturating_sub(self.allocated.cpu_millis),
            memory_mb: self
                .allocatable
                .memory_mb
                .saturating_sub(self.allocated.memory_mb),
        }
    }

    /// Whether the host holds (or can pull) `image`.
    pub fn has_image(&self, image: &str) -> bool {
        // The Docker runtime pulls what it does not hold.
        self.runtime == "docker" || self.images.contains(image)
    }
}

/// One placement to decide.
#[derive(Debug, Clone, Default)]
pub struct PlacementRequest {
    pub org_id: String,
    pub resources: Resources,
    pub image: String,
    /// The sandbox's own labels (anti-affinity groups by them).
    pub labels: BTreeMap<String, String>,
    pub placement: Placement,
    /// The strategy in force (the request's, if allowed, else the
    /// deployment's).
    pub strategy: PlacementStrategy,
    /// Hosts that already failed this sandbox.
    pub exclude: BTreeSet<String>,
}

impl PlacementRequest {
    /// The anti-affinity group (`key=value`) of the sandbox, if any.
    pub fn group(&self) -> Option<String> {
        let key = self.placement.spread_by.as_ref()?;
        let value = self.labels.get(key)?;
        Some(format!("{key}={value}"))
    }
}

/// Whether `host` may take the request at all.
pub fn feasible(id: &str, host: &HostCapacity, request: &PlacementRequest) -> bool {
    eligible(id, host, request) && request.resources.fits_in(host.free())
}

/// Every constraint but free capacity.
fn eligible(id: &str, host: &HostCapacity, request: &PlacementRequest) -> bool {
    if !host.schedulable || request.exclude.contains(id) {
        return false;
    }
    match &host.pool {
        Some(org) if *org != request.org_id => return false,
        None if request.placement.private_pool_only => return false,
        _ => {}
    }
    if let Some(runtime) = &request.placement.runtime {
        if host.runtime != *runtime {
            return false;
        }
    }
    request
        .placement
        .selector
        .iter()
        .all(|(k, v)| host.labels.get(k) == Some(v))
}

/// How good `host` is for a feasible request: higher is better. Ordered by
/// (image present, fewest of the sandbox's anti-affinity group, strategy).
pub fn score(host: &HostCapacity, request: &PlacementRequest, group: Option<&str>) -> Score {
    let free = host.free();
    let after_cpu = free.cpu_millis.saturating_sub(request.resources.cpu_millis);
    let after_mem = free.memory_mb.saturating_sub(request.resources.memory_mb);
    // Free share after placement, in parts per million, of the tighter
    // resource.
    let free_share =
        ppm(after_cpu, host.allocatable.cpu_millis).min(ppm(after_mem, host.allocatable.memory_mb));
    let fit = match request.strategy {
        PlacementStrategy::Spread => free_share,
        PlacementStrategy::Binpack => 1_000_000u64.saturating_sub(free_share),
    };
    let same_group = group.map_or(0, |g| host.groups.get(g).copied().unwrap_or(0));
    Score {
        image: host.has_image(&request.image),
        spread: u32::MAX - same_group,
        fit,
    }
}

/// A host's score; compared field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Score {
    pub image: bool,
    pub spread: u32,
    pub fit: u64,
}

/// A small, fast random source (SplitMix64) for sampling; seeded by the
/// caller, so tests are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        // n is a fleet size: the modulo bias is irrelevant here.
        usize::try_from(self.next_u64() % (n.max(1) as u64)).unwrap_or(0)
    }
}

/// The fleet as [`choose`] reads it: hosts by id, an id list to sample
/// from, and each org's private pool.
pub trait Fleet {
    fn host(&self, id: &str) -> Option<&HostCapacity>;
    /// All host ids, in a stable order.
    fn ids(&self) -> &[String];
    /// The hosts of `org`'s private pool.
    fn pool(&self, org: &str) -> &[String];
}

/// Picks the host for `request`, or says how close the fleet came.
pub fn choose<F: Fleet>(
    fleet: &F,
    request: &PlacementRequest,
    rng: &mut Rng,
) -> Result<String, CorralError> {
    let group = request.group();
    let group = group.as_deref();
    let mut best: Option<(Score, &String)> = None;
    // The org's own pool first: it is small and always scanned whole.
    for id in fleet.pool(&request.org_id) {
        offer(fleet, id, request, group, &mut best);
    }
    if best.is_none() && !request.placement.private_pool_only {
        let ids = fleet.ids();
        if ids.len() < FULL_SCAN_BELOW {
            for id in ids {
                offer(fleet, id, request, group, &mut best);
            }
        } else {
            let mut seen = 0;
            for _ in 0..SAMPLE_PROBES {
                let id = &ids[rng.below(ids.len())];
                if offer(fleet, id, request, group, &mut best) {
                    seen += 1;
                    if seen >= SAMPLE_FEASIBLE {
                        break;
                    }
                }
            }
            if best.is_none() {
                for id in ids {
                    offer(fleet, id, request, group, &mut best);
                }
            }
        }
    }
    if let Some((_, id)) = best {
        return Ok(id.clone());
    }
    Err(no_capacity(fleet, request))
}

/// Scores `id` if feasible and keeps it if it beats `best`; answers whether
/// it was feasible.
fn offer<'a, F: Fleet>(
    fleet: &'a F,
    id: &'a String,
    request: &PlacementRequest,
    group: Option<&str>,
    best: &mut Option<(Score, &'a String)>,
) -> bool {
    let Some(host) = fleet.host(id) else {
        return false;
    };
    if !feasible(id, host, request) {
        return false;
    }
    let s = score(host, request, group);
    let better = match best {
        None => true,
        Some((bs, bid)) => s > *bs || (s == *bs && id < *bid),
    };
    if better {
        *best = Some((s, id));
    }
    true
}

/// The error for a request nothing can take, with the free slot closest to
/// fitting it among the hosts that meet its other constraints.
fn no_capacity<F: Fleet>(fleet: &F, request: &PlacementRequest) -> CorralError {
    let want = request.resources;
    let coverage = |free: Resources| -> u64 {
        let part = |have: u64, want: u64| {
            if want == 0 {
                u64::MAX
            } else {
                ppm(have, want)
            }
        };
        part(free.cpu_millis, want.cpu_millis).min(part(free.memory_mb, want.memory_mb))
    };
    let mut largest: Option<(Resources, u64)> = None;
    for id in fleet.ids() {
        let Some(host) = fleet.host(id) else { continue };
        if !eligible(id, host, request) {
            continue;
        }
        let free = host.free();
        let covers = coverage(free);
        if largest.is_none_or(|(_, l)| covers > l) {
            largest = Some((free, covers));
        }
    }
    let largest = largest.map(|(free, _)| free).unwrap_or_default();
    CorralError::NoCapacity {
        requested_cpu_millis: u32::try_from(want.cpu_millis).unwrap_or(u32::MAX),
        requested_memory_mb: want.memory_mb,
        largest_free_cpu_millis: largest.cpu_millis,
        largest_free_memory_mb: largest.memory_mb,
    }
}

/// What sandboxes may reserve on a host that reported `reported`: less
/// `reserve`, times `overcommit`.
pub fn allocatable(reported: Resources, reserve: Resources, overcommit: f64) -> Resources {
    let scale = |have: u64, keep: u64| -> u64 {
        let left = have.saturating_sub(keep) as f64 * overcommit.max(0.0);
        if left >= u64::MAX as f64 {
            u64::MAX
        } else {
            left as u64
        }
    };
    Resources {
        cpu_millis: scale(reported.cpu_millis, reserve.cpu_millis),
        memory_mb: scale(reported.memory_mb, reserve.memory_mb),
    }
}

/// `part / whole` in parts per million (0 for an empty whole), in 64-bit
/// arithmetic unless `part` is too large for it.
fn ppm(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    match part.checked_mul(1_000_000) {
        Some(scaled) => scaled / whole,
        None => u64::try_from(u128::from(part) * 1_000_000 / u128::from(whole)).unwrap_or(u64::MAX),
    }
}

/// A fleet in a plain map, for tests and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct MapFleet {
    pub hosts: HashMap<String, HostCapacity>,
    pub ids: Vec<String>,
    pub pools: HashMap<String, Vec<String>>,
}

impl MapFleet {
    pub fn insert(&mut self, id: &str, host: HostCapacity) {
        if let Some(org) = &host.pool {
            self.pools
                .entry(org.clone())
                .or_default()
                .push(id.to_string());
        }
        if self.hosts.insert(id.to_string(), host).is_none() {
            self.ids.push(id.to_string());
        }
    }
}

impl Fleet for MapFleet {
    fn host(&self, id: &str) -> Option<&HostCapacity> {
        self.hosts.get(id)
    }
    fn ids(&self) -> &[String] {
        &self.ids
    }
    fn pool(&self, org: &str) -> &[String] {
        self.pools.get(org).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpu: u64, mem: u64, used_cpu: u64, used_mem: u64) -> HostCapacity {
        HostCapacity {
            allocatable: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
            },
            allocated: Resources {
                cpu_millis: used_cpu,
                memory_mb: used_mem,
            },
            schedulable: true,
            runtime: "fake".into(),
            images: BTreeSet::from(["busybox".to_string()]),
            ..Default::default()
        }
    }

    fn req(cpu: u64, mem: u64) -> PlacementRequest {
        PlacementRequest {
            org_id: "org_a".into(),
            resources: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
            },
            image: "busybox".into(),
            ..Default::default()
        }
    }

    fn fleet(hosts: Vec<(&str, HostCapacity)>) -> MapFleet {
        let mut fleet = MapFleet::default();
        for (id, h) in hosts {
            fleet.insert(id, h);
        }
        fleet
    }

    fn pick(fleet: &MapFleet, request: &PlacementRequest) -> Result<String, CorralError> {
        choose(fleet, request, &mut Rng::new(7))
    }

    #[test]
    fn spread_prefers_the_least_loaded_and_binpack_the_fullest() {
        let f = fleet(vec![
            ("a", host(4000, 4096, 3000, 1024)),
            ("b", host(4000, 4096, 1000, 1024)),
        ]);
        assert_eq!(pick(&f, &req(500, 256)).ok().as_deref(), Some("b"));
        let mut binpack = req(500, 256);
        binpack.strategy = PlacementStrategy::Binpack;
        assert_eq!(pick(&f, &binpack).ok().as_deref(), Some("a"));
        // Binpack still never picks a host the request does not fit.
        binpack.resources.cpu_millis = 1500;
        assert_eq!(pick(&f, &binpack).ok().as_deref(), Some("b"));
    }

    #[test]
    fn no_capacity_names_the_closest_slot_among_eligible_hosts() {
        let mut other_pool = host(64_000, 65_536, 0, 0);
        other_pool.pool = Some("org_b".into());
        let f = fleet(vec![
            ("a", host(1000, 1024, 900, 0)),
            ("b", host(1000, 1024, 0, 1000)),
            ("p", other_pool),
        ]);
        match pick(&f, &req(200, 100)) {
            Err(CorralError::NoCapacity {
                largest_free_cpu_millis,
                largest_free_memory_mb,
                ..
            }) => assert_eq!(
                (largest_free_cpu_millis, largest_free_memory_mb),
                (100, 1024)
            ),
            other => panic!("expected no capacity, got {other:?}"),
        }
    }

    #[test]
    fn unschedulable_and_excluded_hosts_are_skipped() {
        let mut down = host(8000, 8192, 0, 0);
        down.schedulable = false;
        let f = fleet(vec![("a", down), ("b", host(8000, 8192, 0, 0))]);
        let mut r = req(100, 16);
        assert_eq!(pick(&f, &r).ok().as_deref(), Some("b"));
        r.exclude.insert("b".into());
        assert!(pick(&f, &r).is_err());
    }

    #[test]
    fn selectors_and_runtime_filter_hosts() {
        let mut gpu = host(1000, 1024, 900, 900);
        gpu.labels = BTreeMap::from([
            ("gpu".into(), "a100".into()),
            ("region".into(), "eu".into()),
        ]);
        let mut docker = host(1000, 1024, 0, 0);
        docker.runtime = "docker".into();
        let f = fleet(vec![
            ("gpu", gpu),
            ("plain", host(1000, 1024, 0, 0)),
            ("docker", docker),
        ]);
        let mut r = req(50, 50);
        r.placement.selector = BTreeMap::from([("gpu".into(), "a100".into())]);
        assert_eq!(pick(&f, &r).ok().as_deref(), Some("gpu"));
        r.placement.selector.insert("region".into(), "us".into());
        assert!(pick(&f, &r).is_err());
        let mut r = req(50, 50);
        r.placement.runtime = Some("docker".into());
        assert_eq!(pick(&f, &r).ok().as_deref(), Some("docker"));
    }

    #[test]
    fn private_pools_take_only_their_org_and_come_first() {
        let mut mine = host(1000, 1024, 800, 800);
        mine.pool = Some("org_a".into());
        let mut theirs = host(64_000, 65_536, 0, 0);
        theirs.pool = Some("org_b".into());
        let f = fleet(vec![
            ("mine", mine),
            ("theirs", theirs),
            ("shared", host(64_000, 65_536, 0, 0)),
        ]);
        // org_a: its own pool first, though the shared host is emptier.
        assert_eq!(pick(&f, &req(100, 100)).ok().as_deref(), Some("mine"));
        // Too big for its pool: the shared fleet, never org_b's host.
        assert_eq!(pick(&f, &req(500, 500)).ok().as_deref(), Some("shared"));
        let mut only = req(500, 500);
        only.placement.private_pool_only = true;
        assert!(pick(&f, &only).is_err());
        // org_c has no pool: shared only.
        let mut other = req(100, 100);
        other.org_id = "org_c".into();
        assert_eq!(pick(&f, &other).ok().as_deref(), Some("shared"));
    }

    #[test]
    fn anti_affinity_spreads_a_group_and_images_are_preferred() {
        let mut a = host(4000, 4096, 0, 0);
        a.groups.insert("app=web".into(), 1);
        let b = host(4000, 4096, 2000, 2000);
        let f = fleet(vec![("a", a), ("b", b)]);
        let mut r = req(100, 100);
        r.labels = BTreeMap::from([("app".into(), "web".into())]);
        // Without spread_by: the emptier host.
        assert_eq!(pick(&f, &r).ok().as_deref(), Some("a"));
        r.placement.spread_by = Some("app".into());
        assert_eq!(pick(&f, &r).ok().as_deref(), Some("b"));

        let mut without = host(8000, 8192, 0, 0);
        without.images.clear();
        let f = fleet(vec![
            ("empty", without),
            ("busy", host(8000, 8192, 4000, 4000)),
        ]);
        assert_eq!(pick(&f, &req(100, 100)).ok().as_deref(), Some("busy"));
    }

    #[test]
    fn allocatable_takes_the_reserve_and_the_overcommit() {
        let reported = Resources {
            cpu_millis: 4000,
            memory_mb: 8192,
        };
        let reserve = Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
        };
        assert_eq!(
            allocatable(reported, reserve, 1.0),
            Resources {
                cpu_millis: 3000,
                memory_mb: 7168
            }
        );
        assert_eq!(allocatable(reported, reserve, 2.0).cpu_millis, 6000);
        assert_eq!(allocatable(reserve, reported, 1.0), Resources::default());
    }

    #[test]
    fn sampling_finds_capacity_in_a_large_fleet_and_never_overfills() {
        let mut f = MapFleet::default();
        for i in 0..2000 {
            // Only a few hosts have room.
            let used = if i % 97 == 0 { 0 } else { 1000 };
            f.insert(&format!("h{i:05}"), host(1000, 1000, used, used));
        }
        let mut rng = Rng::new(42);
        let mut placed = 0;
        loop {
            let r = req(250, 250);
            match choose(&f, &r, &mut rng) {
                Ok(id) => {
                    let h = f.hosts.get_mut(&id).expect("chosen host exists");
                    h.allocated.cpu_millis += 250;
                    h.allocated.memory_mb += 250;
                    assert!(h.allocated.cpu_millis <= h.allocatable.cpu_millis);
                    placed += 1;
                }
                Err(CorralError::NoCapacity { .. }) => break,
                Err(other) => panic!("{other:?}"),
            }
        }
        // 21 empty hosts x 4 slots: every slot is found, none more.
        assert_eq!(placed, 21 * 4);
    }
}
