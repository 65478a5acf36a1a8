//! The `fapool` command line.

use clap::{Parser, Subcommand};
use fapool::app;
use fapool::backend::BackendKind;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fapool", version, about = "Benchmark long-context LLM inference: static TP x PP versus an elastic flash-attention pool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job's strategies over its workload (one MPI rank per GPU) and write an HDF5 results file.
    Run {
        /// The job spec (TOML).
        job: PathBuf,
        /// Results file (default: results/<job name>-<UTC time>.h5).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing results file.
        #[arg(long)]
        force: bool,
        /// Continue an interrupted run in FILE: batches it holds are skipped.
        #[arg(long, value_name = "FILE")]
        resume: Option<PathBuf>,
        /// Abort every rank (exit 6) when one makes no progress for this many seconds (0: off).
        #[arg(long, default_value_t = 0.0)]
        timeout: f64,
        /// Override the job's backend.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Override any job field, e.g. `--set workload.sequences_per_category=20` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Check a job spec against every rule without MPI or GPUs.
    Validate {
        job: PathBuf,
        /// Ranks the launch would start.
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        /// Most ranks per node (default: all on one node).
        #[arg(long)]
        local_ranks: Option<usize>,
        /// GPUs visible per node (omit for the CPU backend).
        #[arg(long)]
        gpus: Option<usize>,
        /// Per-rank memory budget in GiB (default: the job's, else 80).
        #[arg(long)]
        memory_gib: Option<f64>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Run every strategy of a job beside the single-rank model and compare logits and greedy tokens.
    Verify {
        job: PathBuf,
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Largest relative L2 error of the logits that passes.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// Feed the reference's tokens to every strategy (compares logits step by step even where low precision flips a token).
        #[arg(long)]
        teacher_forcing: bool,
        /// At most this many batches per category.
        #[arg(long, default_value_t = usize::MAX)]
        max_batches: usize,
    },
    /// Print comparison tables (and write plots) from results files.
    Analyze {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show what fapool finds: MPI, ranks, GPUs, CUDA/NCCL/NVML libraries.
    Env,
    /// Measure kernels (one GPU) or communication (every rank of the launch).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Check every CUDA kernel against its f64 reference definition on fresh random inputs (outputs poisoned first).
    CheckGpu {
        /// bf16, fp16, fp32 or all.
        #[arg(long, default_value = "all")]
        dtype: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// GEMMs on dense-4l's shapes, causal prefill attention, decode attention and RMSNorm on this rank's GPU.
    Kernels {
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: fapool::backend::Dtype,
        /// Sequence lengths for attention.
        #[arg(long, value_delimiter = ',', default_value = "4096,16384,65536")]
        seq: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Also write the table to this HDF5 file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// All-reduce, all-gather, broadcast and send/recv over message sizes, through the comm layer (run under mpirun).
    Comm {
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: fapool::backend::Dtype,
        /// Message sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,256,1024")]
        sizes_mib: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let exit = match cli.cmd {
        Cmd::Run { job, out, force, resume, timeout, backend, set } => app::run(&job, app::RunArgs { out, resume, force, backend, timeout_s: timeout }, &set),
        Cmd::Validate { job, ranks, local_ranks, gpus, memory_gib, set } => app::validate(&job, ranks, local_ranks, gpus, memory_gib, &set),
        Cmd::Verify { job, backend, set, tolerance, teacher_forcing, max_batches } => app::verify(&job, backend, &set, tolerance, teacher_forcing, max_batches),
        Cmd::Analyze { files } => app::analyze(&files),
        Cmd::Env => app::env(),
        Cmd::Bench { what: BenchCmd::Kernels { dtype, seq, iters, out } } => app::bench_kernels(dtype, &seq, iters, out.as_deref()),
        Cmd::Bench { what: BenchCmd::Comm { backend, dtype, sizes_mib, iters, out } } => app::bench_comm(backend, dtype, &sizes_mib, iters, out.as_deref()),
        Cmd::CheckGpu { dtype, seed } => app::check_gpu(&dtype, seed),
    };
    std::process::exit(exit.code());
}
