//! Cluster files (`jobs/clusters/*.toml`): the GPU model, how many nodes and
//! GPUs per node, and the links between them. World rank `r` sits on node
//! `r / gpus_per_node` (ranks fill nodes in order, as the launch scripts
//! place them). Unknown keys, zero bandwidths and deployments the cluster
//! cannot hold are refused with the rule they break.

use super::gpus::{self, GpuSpec};
use crate::rules::{ensure, violation, Violation};
use serde::Deserialize;
use std::path::Path;

/// A cluster file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    name: String,
    /// A key of the built-in GPU table.
    gpu: String,
    nodes: usize,
    gpus_per_node: usize,
    /// NVLink per GPU as vendors quote it, both directions together (GB/s).
    nvlink_gbs: Option<f64>,
    /// InfiniBand per GPU, one direction (GB/s).
    ib_gbs: Option<f64>,
    nvlink_latency_us: Option<f64>,
    ib_latency_us: Option<f64>,
    /// Fraction of a link's bandwidth a transfer achieves.
    link_efficiency: Option<f64>,
    /// GPU memory (GiB), when it differs from the table's.
    memory_gib: Option<f64>,
}

/// A cluster the planner costs a deployment on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    pub gpu: GpuSpec,
    pub nodes: usize,
    pub gpus_per_node: usize,
    /// One direction, per GPU (GB/s), before `link_efficiency`.
    pub intra_gbs: f64,
    pub inter_gbs: f64,
    pub intra_latency_s: f64,
    pub inter_latency_s: f64,
    pub link_efficiency: f64,
    pub memory_bytes: u64,
}

const GIB: f64 = (1u64 << 30) as f64;

impl ClusterSpec {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self, Violation> {
        let text = std::fs::read_to_string(path).map_err(|e| violation("cluster-file-readable", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses cluster-file text (`source` names it in messages).
    pub fn parse(text: &str, source: &str) -> Result<Self, Violation> {
        let f: ClusterFile = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let rule = if msg.contains("unknown field") { "cluster-keys-known" } else { "cluster-file-valid" };
            violation(rule, format!("{source}: {msg}"))
        })?;
        let gpu = gpus::by_key(&f.gpu).ok_or_else(|| violation("cluster-gpu-known", format!("{source}: unknown gpu `{}` (known: {})", f.gpu, gpus::keys().join(", "))))?;
        ensure(f.nodes > 0 && f.gpus_per_node > 0, "cluster-size-positive", || format!("{source}: nodes and gpus_per_node must be >= 1"))?;
        let nvlink = f.nvlink_gbs.unwrap_or(gpu.nvlink_gbs);
        // Without NVLink, GPUs of a node reach each other over PCIe.
        let intra = if nvlink > 0.0 || f.nvlink_gbs.is_some() { nvlink / 2.0 } else { gpu.pcie_gbs };
        let inter = f.ib_gbs.unwrap_or(gpu.ib_gbs);
        for (key, v) in [("nvlink_gbs", intra), ("ib_gbs", inter)] {
            ensure(v > 0.0 && v.is_finite(), "cluster-bandwidth-positive", || format!("{source}: {key} must be > 0 (got {v})"))?;
        }
        let eff = f.link_efficiency.unwrap_or(0.8);
        ensure(eff > 0.0 && eff <= 1.0, "cluster-bandwidth-positive", || format!("{source}: link_efficiency must be in (0, 1] (got {eff})"))?;
        for (key, v) in [("nvlink_latency_us", f.nvlink_latency_us), ("ib_latency_us", f.ib_latency_us), ("memory_gib", f.memory_gib)] {
            ensure(v.is_none_or(|v| v >= 0.0 && v.is_finite()), "cluster-values-valid", || format!("{source}: {key} must be >= 0"))?;
        }
        Ok(Self {
            name: f.name,
            memory_bytes: (f.memory_gib.unwrap_or(gpu.memory_gib) * GIB) as u64,
            gpu,
            nodes: f.nodes,
            gpus_per_node: f.gpus_per_node,
            intra_gbs: intra,
            inter_gbs: inter,
            intra_latency_s: f.nvlink_latency_us.unwrap_or(4.0) * 1e-6,
            inter_latency_s: f.ib_latency_us.unwrap_or(8.0) * 1e-6,
            link_efficiency: eff,
        })
    }

    /// A cluster of `gpu`s just large enough for `world` ranks, 8 per node
    /// (what the planner assumes without `--cluster`).
    pub fn default_for(gpu: GpuSpec, world: usize) -> Self {
        let per = if gpu.key == "cpu" { world.max(1) } else { 8 };
        let intra = if gpu.nvlink_gbs > 0.0 { gpu.nvlink_gbs / 2.0 } else { gpu.pcie_gbs };
        let (lat_intra, lat_inter) = if gpu.key == "cpu" { (2e-6, 5e-6) } else { (4e-6, 8e-6) };
        Self {
            name: format!("{} x{}", gpu.key, world),
            memory_bytes: (gpu.memory_gib * GIB) as u64,
            nodes: world.div_ceil(per).max(1),
            gpus_per_node: per,
            intra_gbs: intra,
            inter_gbs: gpu.ib_gbs,
            intra_latency_s: lat_intra,
            inter_latency_s: lat_inter,
            link_efficiency: 0.8,
            gpu,
        }
    }

    /// The node of world rank `rank`.
    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.gpus_per_node
    }

    /// A deployment of `world` ranks must fit the cluster and fill whole nodes.
    pub fn check_deployment(&self, world: usize) -> Result<(), Violation> {
        let total = self.nodes * self.gpus_per_node;
        ensure(world <= total, "deployment-fits-cluster", || format!("the deployment needs {world} GPUs, cluster `{}` has {} nodes x {} = {total}", self.name, self.nodes, self.gpus_per_node))?;
        ensure(world <= self.gpus_per_node || world % self.gpus_per_node == 0, "gpus-per-node-divides-deployment", || {
            format!("{world} GPUs do not fill whole nodes of {} (cluster `{}`): {} nodes and {} GPUs left over", self.gpus_per_node, self.name, world / self.gpus_per_node, world % self.gpus_per_node)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A100: &str = "name = \"t\"\ngpu = \"a100-80gb-sxm\"\nnodes = 2\ngpus_per_node = 8\nnvlink_gbs = 600\nib_gbs = 25\n";

    fn rule(text: &str) -> &'static str {
        ClusterSpec::parse(text, "test").unwrap_err().rule
    }

    #[test]
    fn a_cluster_file_gives_links_per_direction() {
        let c = ClusterSpec::parse(A100, "test").unwrap();
        assert_eq!((c.intra_gbs, c.inter_gbs, c.gpus_per_node, c.node_of(9)), (300.0, 25.0, 8, 1));
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let e = ClusterSpec::parse(&format!("{A100}nvlink_gbps = 3\n"), "test").unwrap_err();
        assert_eq!(e.rule, "cluster-keys-known");
        assert!(e.detail.contains("nvlink_gbps"), "{e}");
    }

    #[test]
    fn a_zero_bandwidth_is_refused() {
        assert_eq!(rule(&A100.replace("ib_gbs = 25", "ib_gbs = 0")), "cluster-bandwidth-positive");
    }

    #[test]
    fn deployments_must_fill_whole_nodes_and_fit() {
        let c = ClusterSpec::parse(A100, "test").unwrap();
        assert!(c.check_deployment(16).is_ok() && c.check_deployment(4).is_ok());
        assert_eq!(c.check_deployment(12).unwrap_err().rule, "gpus-per-node-divides-deployment");
        assert_eq!(c.check_deployment(24).unwrap_err().rule, "deployment-fits-cluster");
    }
}
