//! What every container sandbox is confined by, shared by the runc and
//! docker runtimes: the capability set, the default seccomp profile
//! (`profiles/seccomp.json`, in the OCI shape, shipped in the binary), and the
//! user-namespace mapping with the host check for it. The runtimes also set
//! no-new-privileges, the pids limit, the network and a read-only root from
//! the [`crate::runtime::SandboxSpec`].

use oci_spec::runtime::{Arch, Capability, LinuxSeccomp};

use crate::runtime::RuntimeError;

/// The capabilities a sandbox's processes keep, in every set: runc's
/// default set (`AUDIT_WRITE`, `KILL`, `NET_BIND_SERVICE`). Everything else
/// (`SYS_ADMIN`, `NET_RAW`, `CHOWN`, `SETUID`, `DAC_OVERRIDE`, ...) is
/// dropped: root inside a sandbox cannot change file ownership, switch
/// users or bypass file permissions.
pub const CAPABILITIES: &[Capability] = &[
    Capability::AuditWrite,
    Capability::Kill,
    Capability::NetBindService,
];

/// The same set in Docker's `cap_add` spelling.
pub const DOCKER_CAPABILITIES: &[&str] = &["AUDIT_WRITE", "KILL", "NET_BIND_SERVICE"];

/// The capability bit mask of [`CAPABILITIES`], as `/proc/<pid>/status`
/// shows it in `CapEff` (tests compare against it).
pub const CAPABILITY_MASK: u64 = (1 << 29) // AUDIT_WRITE
    | (1 << 5) // KILL
    | (1 << 10); // NET_BIND_SERVICE

const SECCOMP_PROFILE: &str = include_str!("../profiles/seccomp.json");

/// The default seccomp profile for this host's architecture.
pub fn seccomp_profile() -> Result<LinuxSeccomp, RuntimeError> {
    let mut profile: LinuxSeccomp = serde_json::from_str(SECCOMP_PROFILE)
        .map_err(|e| RuntimeError::runtime("the built-in seccomp profile", e))?;
    let arches = match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "x86" => vec![Arch::ScmpArchX86],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        // Native only: libseccomp's default.
        _ => Vec::new(),
    };
    if !arches.is_empty() {
        profile.set_architectures(Some(arches));
    }
    Ok(profile)
}

/// The first host uid (and gid) that root inside a user-namespaced sandbox
/// maps to; [`USERNS_SIZE`] ids from there are the sandbox's.
pub const USERNS_HOST_BASE: u32 = 1_000_000;
/// How many ids a user-namespaced sandbox gets (0..65535 inside).
pub const USERNS_SIZE: u32 = 65_536;

/// Whether this host can run sandboxes in user namespaces: the kernel has
/// them and allows more than zero (`/proc/sys/user/max_user_namespaces`).
pub fn user_namespaces_supported() -> bool {
    std::path::Path::new("/proc/self/ns/user").exists()
        && std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seccomp_profile_parses_and_refuses_the_dangerous_calls() {
        let profile = seccomp_profile().expect("the profile parses");
        assert_eq!(
            profile.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
        );
        let refused: Vec<String> = profile
            .syscalls()
            .as_ref()
            .expect("syscalls")
            .iter()
            .filter(|s| {
                s.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
                    && s.args().is_none()
            })
            .flat_map(|s| s.names().clone())
            .collect();
        for name in [
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "bpf",
            "keyctl",
            "init_module",
            "kexec_load",
            "reboot",
            "perf_event_open",
            "clone3",
        ] {
            assert!(refused.iter().any(|n| n == name), "{name} is refused");
        }
        assert!(
            !refused.iter().any(|n| n == "clone"),
            "plain clone is allowed"
        );
    }

    #[test]
    fn the_capability_mask_matches_the_list() {
        assert_eq!(CAPABILITIES.len(), DOCKER_CAPABILITIES.len());
        assert_eq!(CAPABILITY_MASK.count_ones() as usize, CAPABILITIES.len());
        for (cap, name) in CAPABILITIES.iter().zip(DOCKER_CAPABILITIES) {
            assert_eq!(cap.to_string(), *name);
        }
    }
}
