//! The Debian package: `deploy/package.sh --no-build --fast` packages the binaries this
//! test run built (no release build), and the .deb is checked as dpkg sees it — control
//! fields (Depends), the files and their modes, the conffile, the maintainer scripts (the
//! unit is neither enabled nor started at install, and an upgrade does not stop it) — then
//! unpacked: the packaged binaries run, the packaged example config passes
//! `--check-config`, the man pages are roff, the completions name clusterctl, and
//! `systemd-analyze verify` accepts the packaged unit (where systemd-analyze exists).
//!
//! Needs cargo-deb (deploy/setup.sh installs it; package.sh would too) and dpkg-deb.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(what: &str, cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(what, cmd).stdout).into_owned()
}

/// The target dir and the profile (as `package.sh --profile` takes it) this test was
/// built in: `<target>/<profile dir>/deps/package-xxxx`.
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{exe:?} is not in <target>/<profile>/deps"));
    let target = profile_dir
        .parent()
        .unwrap_or_else(|| panic!("{profile_dir:?} has no parent"));
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(p) => p.to_string(),
        None => panic!("{profile_dir:?} names no profile"),
    };
    (target.to_path_buf(), profile)
}

#[test]
fn the_debian_package_installs_what_a_host_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Both binaries must be built (a workspace `cargo test` builds them).
    for (name, package) in [("cluster-agent", "cluster-agent"), ("clusterctl", "ctl")] {
        cluster_tests::locate_binary(name, package).unwrap_or_else(|e| {
            panic!("{e} (build it first: cargo build -p cluster-agent -p ctl)")
        });
    }
    let (target, profile) = target_and_profile();
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));

    let printed = stdout(
        "deploy/package.sh",
        Command::new(root.join("deploy/package.sh"))
            .args(["--no-build", "--fast", "--profile", &profile, "--out"])
            .arg(out.path())
            .env("CARGO_TARGET_DIR", &target),
    );
    let deb = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(format!("cluster-agent_{version}-1_amd64.deb").as_str()),
        "package.sh printed {printed:?}"
    );
    assert!(deb.starts_with(out.path()) && deb.is_file(), "{deb:?}");

    // Control fields.
    let info = stdout("dpkg-deb -I", Command::new("dpkg-deb").arg("-I").arg(&deb));
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} field in:\n{info}"))
            .to_string()
    };
    assert_eq!(field("Package"), "cluster-agent", "{info}");
    assert_eq!(field("Version"), format!("{version}-1"), "{info}");
    assert_eq!(field("Section"), "admin", "{info}");
    let depends = field("Depends");
    for dep in ["iproute2", "libc6"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }

    // The files, with their modes.
    let contents = stdout("dpkg-deb -c", Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mode_of = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{contents}"))
            .to_string()
    };
    for (path, mode) in [
        ("/usr/bin/cluster-agent", "-rwxr-xr-x"),
        ("/usr/bin/clusterctl", "-rwxr-xr-x"),
        (
            "/usr/lib/systemd/system/cluster-agent.service",
            "-rw-r--r--",
        ),
        ("/usr/lib/tmpfiles.d/cluster-agent.conf", "-rw-r--r--"),
        ("/etc/cluster-agent/agent.toml", "-rw-r-----"),
        (
            "/usr/share/doc/cluster-agent/examples/agent.toml",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/cluster-agent/README.md", "-rw-r--r--"),
        ("/usr/share/doc/cluster-agent/copyright", "-rw-r--r--"),
        ("/usr/share/man/man1/clusterctl.1.gz", "-rw-r--r--"),
        (
            "/usr/share/man/man1/clusterctl-vm-migrate.1.gz",
            "-rw-r--r--",
        ),
        ("/usr/share/man/man8/cluster-agent.8.gz", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/clusterctl",
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_clusterctl",
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/clusterctl.fish",
            "-rw-r--r--",
        ),
    ] {
        assert_eq!(mode_of(path), mode, "{path}");
    }

    // Control members: the conffile; the unit is not enabled or started at install
    // (the config must name this host first), an upgrade does not stop it (that would
    // stop the VMs of an agent without vm_workers), a removal does.
    let ctrl = out.path().join("control");
    run(
        "dpkg-deb -e",
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl),
    );
    let member = |name: &str| {
        std::fs::read_to_string(ctrl.join(name))
            .unwrap_or_else(|e| panic!("control member {name}: {e}"))
    };
    assert_eq!(member("conffiles").trim(), "/etc/cluster-agent/agent.toml");
    let postinst = member("postinst");
    assert!(
        postinst.contains("systemd-tmpfiles --create cluster-agent.conf"),
        "{postinst}"
    );
    // cargo-deb's "don't enable" step: it re-enables only a unit that was enabled before
    // an upgrade; nothing starts the unit.
    assert!(
        postinst.contains("deb-systemd-helper debian-installed cluster-agent.service")
            && !postinst.contains("deb-systemd-invoke"),
        "postinst enables or starts the unit on a fresh install:\n{postinst}"
    );
    let prerm = member("prerm");
    assert!(
        prerm.contains("\"$1\" = remove") && prerm.contains("deb-systemd-invoke stop"),
        "prerm must stop the agent on removal only:\n{prerm}"
    );

    // Unpacked: what runs on a host.
    let fs = out.path().join("root");
    run(
        "dpkg-deb -x",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&fs),
    );
    let ctl_version = stdout(
        "clusterctl --version",
        Command::new(fs.join("usr/bin/clusterctl")).arg("--version"),
    );
    assert_eq!(ctl_version.trim(), format!("clusterctl {version}"));
    let help = stdout(
        "cluster-agent --help",
        Command::new(fs.join("usr/bin/cluster-agent")).arg("--help"),
    );
    assert!(
        help.contains("--config") && help.contains("--check-config"),
        "{help}"
    );
    // The shipped conffile is a valid config as it is (only the host's values to edit).
    let checked = stdout(
        "cluster-agent --check-config",
        Command::new(fs.join("usr/bin/cluster-agent"))
            .arg("--check-config")
            .arg("--config")
            .arg(fs.join("etc/cluster-agent/agent.toml")),
    );
    assert!(checked.contains("mgmt_addr"), "{checked}");
    assert_eq!(
        std::fs::read(fs.join("etc/cluster-agent/agent.toml")).ok(),
        std::fs::read(root.join("deploy/agent.example.toml")).ok(),
        "the conffile is deploy/agent.example.toml"
    );
    for page in [
        "usr/share/man/man1/clusterctl.1.gz",
        "usr/share/man/man8/cluster-agent.8.gz",
    ] {
        let roff = stdout(
            "gzip -dc",
            Command::new("gzip").arg("-dc").arg(fs.join(page)),
        );
        assert!(
            roff.lines().any(|l| l.starts_with(".TH ")),
            "{page} is not a man page: {}",
            &roff[..roff.len().min(300)]
        );
    }
    let bash = std::fs::read_to_string(fs.join("usr/share/bash-completion/completions/clusterctl"))
        .unwrap_or_default();
    assert!(bash.contains("complete -F _clusterctl"), "bash completion");
    let tmpfile = std::fs::read_to_string(fs.join("usr/lib/tmpfiles.d/cluster-agent.conf"))
        .unwrap_or_default();
    assert!(
        tmpfile
            .lines()
            .any(|l| l.trim() == "d /var/lib/cluster-agent 0700 root root -"),
        "{tmpfile}"
    );

    // The packaged unit runs the packaged binary; systemd-analyze accepts it (with
    // ExecStart pointing at the unpacked copy, since verify checks the binary exists).
    let unit = std::fs::read_to_string(fs.join("usr/lib/systemd/system/cluster-agent.service"))
        .unwrap_or_else(|e| panic!("read the packaged unit: {e}"));
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/cluster-agent --config /etc/cluster-agent/agent.toml"),
        "{unit}"
    );
    let copy = out.path().join("cluster-agent.service");
    let agent = fs.join("usr/bin/cluster-agent");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/cluster-agent", &agent.display().to_string()),
    )
    .unwrap_or_else(|e| panic!("write unit: {e}"));
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Err(_) => eprintln!("systemd-analyze is not installed: packaged unit not verified"),
        Ok(v) => assert!(
            v.status.success() && v.stderr.iter().all(u8::is_ascii_whitespace),
            "systemd-analyze verify: {}{}",
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&v.stdout)
        ),
    }
}
