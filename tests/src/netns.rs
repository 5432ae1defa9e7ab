//! Real network faults: a network namespace ("the cloud's region") joined to the test's
//! namespace by a veth pair, with `tc netem` latency and loss on both ends. Needs root
//! and iproute2; [`Region::create`] returns `None` (with the reason) where it cannot.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Result};

/// A namespace with a veth link to the root namespace; removed on drop.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// The root namespace's end of the link.
    pub host_ip: Ipv4Addr,
    /// The address inside the namespace (bind servers here).
    pub ns_ip: Ipv4Addr,
    /// Whether the kernel has `sch_netem`; without it the link only goes up and down.
    pub netem: bool,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Region {
    /// Creates namespace `op<tag>` linked over 10.77.<tag>.0/24, with `netem` (e.g.
    /// "delay 20ms 5ms loss 1%") applied in both directions. `Ok(Err(reason))` where
    /// namespaces are not available.
    pub fn create(tag: u8, netem: &str) -> Result<std::result::Result<Self, String>> {
        let root = Command::new("id").arg("-u").output()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0" {
            return Ok(Err("not root".into()));
        }
        for tool in ["ip", "tc"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Ok(Err(format!("{tool} (iproute2) is not installed")));
            }
        }
        let pid = std::process::id() % 10_000;
        let r = Self {
            name: format!("op{tag}-{pid}"),
            host_if: format!("oph{tag}-{pid}"),
            ns_if: format!("opn{tag}-{pid}"),
            host_ip: Ipv4Addr::new(10, 77, tag, 1),
            ns_ip: Ipv4Addr::new(10, 77, tag, 2),
            netem: true,
        };
        let mut r = r;
        if let Err(e) = run(&["ip", "netns", "add", &r.name]) {
            return Ok(Err(format!("cannot create a network namespace: {e}")));
        }
        r.setup()?;
        if let Err(e) = r.netem_cmd("add", netem) {
            eprintln!("tc netem unavailable ({e:#}); the region link can only be cut");
            r.netem = false;
        }
        Ok(Ok(r))
    }

    fn setup(&self) -> Result<()> {
        let (n, h, i) = (&self.name, &self.host_if, &self.ns_if);
        run(&["ip", "link", "add", h, "type", "veth", "peer", "name", i])?;
        run(&["ip", "link", "set", i, "netns", n])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.host_ip),
            "dev",
            h,
        ])?;
        run(&["ip", "link", "set", h, "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.ns_ip),
            "dev",
            i,
        ])?;
        run(&["ip", "netns", "exec", n, "ip", "link", "set", i, "up"])?;
        run(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"])
    }

    fn netem_cmd(&self, verb: &str, spec: &str) -> Result<()> {
        let spec: Vec<&str> = spec.split_whitespace().collect();
        let mut host = vec!["tc", "qdisc", verb, "dev", &self.host_if, "root", "netem"];
        host.extend(&spec);
        run(&host)?;
        let mut ns = vec![
            "ip",
            "netns",
            "exec",
            &self.name,
            "tc",
            "qdisc",
            verb,
            "dev",
            &self.ns_if,
            "root",
            "netem",
        ];
        ns.extend(&spec);
        run(&ns)
    }

    /// Changes the impairment ("loss 100%" cuts the region off). Without netem, a
    /// 100 % loss takes the link down and anything else brings it up.
    pub fn set(&self, netem: &str) -> Result<()> {
        if self.netem {
            return self.netem_cmd("change", netem);
        }
        let state = if netem.contains("loss 100%") {
            "down"
        } else {
            "up"
        };
        run(&["ip", "link", "set", &self.host_if, state])
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
