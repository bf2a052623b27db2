//! The agent's image store: root filesystems kept at
//! `<data_dir>/images/<name>/rootfs`. Owns importing a rootfs tarball,
//! building the `busybox` image from a static busybox binary, and listing
//! images. Every write goes to a hidden temporary directory first and is
//! renamed into place at the end, so a failed import or build leaves nothing
//! behind; image names are validated before any path is built from them.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::runtime::{validate_image_name, RuntimeError};

/// Where the busybox binary is looked for when none is given.
pub const BUSYBOX_CANDIDATES: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// The name of the image `build_busybox` makes.
pub const BUSYBOX_IMAGE: &str = "busybox";

/// `<data_dir>/images`.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

/// The root filesystem of image `name`, which must exist.
pub fn rootfs(data_dir: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
    validate_image_name(name)?;
    let path = images_dir(data_dir).join(name).join("rootfs");
    if path.is_dir() {
        Ok(path)
    } else {
        Err(RuntimeError::ImageNotFound(name.to_string()))
    }
}

/// The names of every complete image, sorted.
pub fn list(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(images_dir(data_dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        // Temporary directories start with '.', which no valid name does.
        .filter(|name| validate_image_name(name).is_ok())
        .filter(|name| images_dir(data_dir).join(name).join("rootfs").is_dir())
        .collect();
    names.sort();
    names
}

/// A temporary image directory under `images/` that is removed unless it is
/// committed (renamed to its final name).
struct StagedImage {
    dir: PathBuf,
    committed: bool,
}

impl StagedImage {
    fn new(data_dir: &Path, name: &str) -> anyhow::Result<Self> {
        let images = images_dir(data_dir);
        std::fs::create_dir_all(&images)
            .with_context(|| format!("creating {}", images.display()))?;
        let dir = images.join(format!(".tmp-{name}-{:016x}", fastrand::u64(..)));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir(dir.join("rootfs"))?;
        Ok(Self {
            dir,
            committed: false,
        })
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn commit(mut self, target: &Path) -> anyhow::Result<()> {
        if target.exists() {
            bail!("image directory {} appeared meanwhile", target.display());
        }
        std::fs::rename(&self.dir, target)
            .with_context(|| format!("moving the image into {}", target.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedImage {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Unpacks the (uncompressed) rootfs tarball `tar_path` as image `name`.
/// Refuses an existing name (sandboxes may be using it as their lower layer)
/// and any entry that would land outside the root.
pub fn import(data_dir: &Path, name: &str, tar_path: &Path) -> anyhow::Result<PathBuf> {
    validate_image_name(name)?;
    let target = images_dir(data_dir).join(name);
    if target.exists() {
        bail!(
            "image {name} already exists at {}; remove that directory first",
            target.display()
        );
    }
    let mut file =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
    let mut magic = [0u8; 2];
    if file.read(&mut magic).is_ok() && magic == [0x1f, 0x8b] {
        bail!(
            "{} is gzip-compressed; decompress it first (gunzip)",
            tar_path.display()
        );
    }
    let file =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;

    let staged = StagedImage::new(data_dir, name)?;
    let root = staged.rootfs();
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut count = 0usize;
    for entry in archive.entries().context("reading the tarball")? {
        let mut entry = entry.context("reading a tarball entry")?;
        let path = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "<unreadable path>".into());
        let unpacked = entry
            .unpack_in(&root)
            .with_context(|| format!("unpacking {path}"))?;
        if !unpacked {
            bail!("tarball entry {path} would escape the image root");
        }
        count += 1;
    }
    if count == 0 {
        bail!("{} holds no entries", tar_path.display());
    }
    staged.commit(&target)?;
    tracing::info!(image = name, entries = count, path = %target.display(), "image imported");
    Ok(target.join("rootfs"))
}

/// The first busybox binary among [`BUSYBOX_CANDIDATES`].
pub fn find_busybox() -> Option<PathBuf> {
    BUSYBOX_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Makes the `busybox` image from a (static) busybox binary: `bin/busybox`, a
/// symlink per applet, the usual top-level directories and an `/etc/passwd`
/// with root. An existing `busybox` image is left alone (building is
/// idempotent).
pub fn build_busybox(data_dir: &Path, busybox: Option<&Path>) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let target = images_dir(data_dir).join(BUSYBOX_IMAGE);
    if target.join("rootfs").is_dir() {
        tracing::info!(path = %target.display(), "the busybox image already exists");
        return Ok(target.join("rootfs"));
    }
    let busybox = match busybox {
        Some(p) => p.to_path_buf(),
        None => find_busybox().with_context(|| {
            format!(
                "no busybox found at {} (install busybox-static)",
                BUSYBOX_CANDIDATES.join(" or ")
            )
        })?,
    };
    let listed = std::process::Command::new(&busybox)
        .arg("--list")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !listed.status.success() {
        bail!("{} --list failed: {}", busybox.display(), listed.status);
    }
    let applets: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| is_applet_name(a))
        .map(str::to_string)
        .collect();
    if applets.is_empty() {
        bail!("{} lists no applets", busybox.display());
    }

    let staged = StagedImage::new(data_dir, BUSYBOX_IMAGE)?;
    let root = staged.rootfs();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root", "var",
    ] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o700))?;
    let bin = root.join("bin").join("busybox");
    std::fs::copy(&busybox, &bin).with_context(|| format!("copying {}", busybox.display()))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    for applet in &applets {
        if applet == "busybox" {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .with_context(|| format!("linking applet {applet}"))?;
    }
    // Scripts commonly start with `#!/usr/bin/env`.
    if applets.iter().any(|a| a == "env") {
        std::os::unix::fs::symlink("/bin/busybox", root.join("usr/bin/env"))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    staged.commit(&target)?;
    tracing::info!(applets = applets.len(), path = %target.display(), "busybox image built");
    Ok(target.join("rootfs"))
}

fn is_applet_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == '[')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, build: impl FnOnce(&mut tar::Builder<std::fs::File>)) -> PathBuf {
        let path = dir.join("rootfs.tar");
        let file = std::fs::File::create(&path).expect("create tar");
        let mut builder = tar::Builder::new(file);
        build(&mut builder);
        builder.finish().expect("finish tar");
        path
    }

    fn add_file(b: &mut tar::Builder<std::fs::File>, path: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        b.append_data(&mut header, path, data).expect("append");
    }

    #[test]
    fn an_imported_tarball_becomes_a_listed_image() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tar = tarball(tmp.path(), |b| {
            add_file(b, "etc/hostname", b"x\n");
            add_file(b, "bin/hello", b"#!/bin/sh\n");
        });
        let data = tmp.path().join("data");
        let root = import(&data, "tiny", &tar).expect("import");
        assert_eq!(
            std::fs::read(root.join("etc/hostname")).expect("read"),
            b"x\n"
        );
        assert_eq!(list(&data), vec!["tiny".to_string()]);
        assert!(rootfs(&data, "tiny").is_ok());
        assert!(matches!(
            rootfs(&data, "nope"),
            Err(RuntimeError::ImageNotFound(_))
        ));
        assert!(
            import(&data, "tiny", &tar).is_err(),
            "an existing image is not replaced"
        );
    }

    #[test]
    fn an_escaping_entry_fails_the_import_and_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tar = tarball(tmp.path(), |b| {
            add_file(b, "ok", b"fine");
            // `append_data` refuses "..", so write the raw name.
            let mut header = tar::Header::new_gnu();
            let data = b"evil";
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            let name = b"../../escaped";
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            b.append(&header, &data[..]).expect("append raw");
        });
        let data = tmp.path().join("data");
        let err = import(&data, "evil", &tar).expect_err("refused");
        assert!(format!("{err:#}").contains("escape"), "{err:#}");
        assert!(!tmp.path().join("escaped").exists());
        assert!(!data.join("escaped").exists());
        assert!(list(&data).is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(images_dir(&data))
            .expect("images dir")
            .collect();
        assert!(
            leftovers.is_empty(),
            "no temporary directory is left behind"
        );
    }

    #[test]
    fn bad_image_names_never_reach_the_file_system() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tar = tmp.path().join("missing.tar");
        for name in ["../x", "a/b", "..", ""] {
            assert!(import(tmp.path(), name, &tar).is_err());
            assert!(rootfs(tmp.path(), name).is_err());
        }
        assert!(!images_dir(tmp.path()).exists());
    }

    #[test]
    fn the_busybox_image_has_applets_and_etc_passwd() {
        let Some(busybox) = find_busybox() else {
            eprintln!("SKIPPED: busybox image test: busybox-static is not installed");
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = build_busybox(tmp.path(), Some(&busybox)).expect("build");
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).expect("sh link"),
            PathBuf::from("busybox")
        );
        assert!(root.join("bin/sleep").exists());
        for dir in ["proc", "sys", "dev", "tmp", "etc", "root"] {
            assert!(root.join(dir).is_dir(), "{dir}");
        }
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
        assert!(passwd.starts_with("root:x:0:0:"));
        assert_eq!(list(tmp.path()), vec!["busybox".to_string()]);
        // Building again is a no-op.
        assert_eq!(
            build_busybox(tmp.path(), Some(&busybox)).expect("rebuild"),
            root
        );
    }
}
