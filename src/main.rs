//! The `fapool` command line.

use clap::{Parser, Subcommand};
use fapool::backend::BackendKind;
use fapool::commands::{self, calibrate::CalibrateArgs, plan::PlanArgs, run::RunArgs, validate::ValidateArgs, verify::VerifyArgs};
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
        /// Write a Chrome/Perfetto trace (JSON) of the chosen batches to this directory.
        #[arg(long, value_name = "DIR")]
        trace: Option<PathBuf>,
        /// Which batches `--trace` records: `last` (of each category), `all`, or CATEGORY/INDEX[,...].
        #[arg(long, default_value = "last", requires = "trace")]
        trace_batches: fapool::runner::timeline::TraceBatches,
        /// Override the job's backend.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Override any job field, e.g. `--set workload.sequences_per_category=20` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Store the planner's predictions from this calibration file (default: the roofline of the run's GPU).
        #[arg(long, value_name = "FILE")]
        calibration: Option<PathBuf>,
    },
    /// Plan a job's strategies on a cluster from their own code: DAGs, predicted TTFT/TPOT/TPS, memory, critical paths (no MPI, no GPU).
    Plan {
        /// The job spec (not needed with --check).
        job: Option<PathBuf>,
        /// Cluster file (jobs/clusters/*.toml); default: the CPU model for CPU jobs, else H200s, 8 per node.
        #[arg(long)]
        cluster: Option<PathBuf>,
        /// Compute times from this calibration file (`fapool calibrate`) instead of the roofline.
        #[arg(long, value_name = "FILE")]
        calibration: Option<PathBuf>,
        /// Sequence lengths (default: every length of the workload).
        #[arg(long, value_delimiter = ',')]
        seq: Vec<usize>,
        /// World size (default: what the job needs); with --search, the GPU budgets.
        #[arg(long, value_delimiter = ',')]
        gpus: Vec<usize>,
        /// Sequences per batch (default: the workload's batch at each length).
        #[arg(long)]
        batch: Option<usize>,
        /// Decode steps to simulate; TPOT beyond them is extrapolated (0: every step).
        #[arg(long, default_value_t = 2)]
        decode_steps: usize,
        /// Write each DAG as DOT (and SVG where Graphviz is installed) to DIR.
        #[arg(long, value_name = "DIR")]
        dot: Option<PathBuf>,
        /// Write each predicted timeline as Chrome/Perfetto trace JSON to DIR.
        #[arg(long, value_name = "DIR")]
        trace: Option<PathBuf>,
        /// Print every GPU's memory and busy, communicating, waiting and idle time, and the critical paths.
        #[arg(long)]
        per_gpu: bool,
        /// Check a deployment plan written by people (e.g. jobs/moe-plan.toml) instead.
        #[arg(long, value_name = "PLAN")]
        check: Option<PathBuf>,
        /// Search configurations for each GPU budget of --gpus at each length of --seq.
        #[arg(long)]
        search: bool,
        #[arg(long, value_enum)]
        objective: Option<fapool::planner::compare::Objective>,
        /// Search FIELD over TOML values, e.g. `--vary chunks=1,2,4` (repeatable).
        #[arg(long, value_name = "FIELD=V1,V2")]
        vary: Vec<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Measure a calibration file for the planner on this backend: GEMMs, attention, bandwidth (and with --comm, under mpirun, messages).
    Calibrate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: fapool::backend::Dtype,
        /// Also measure collectives and point-to-point messages over every rank of the launch.
        #[arg(long)]
        comm: bool,
        /// Take attention's heads and head_dim and the weights' cache footprint from this job's model (default: dense-4l on a GPU, tiny on the CPU).
        #[arg(long)]
        job: Option<PathBuf>,
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
        /// Compare with another implementation's prompts, greedy tokens and logits (JSON) instead of the single-rank model.
        #[arg(long, value_name = "FILE")]
        reference: Option<PathBuf>,
    },
    /// Write a job's weights (seeded, or its checkpoint's) as model.safetensors and config.json in Hugging Face's Llama naming.
    ExportWeights {
        job: PathBuf,
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Element type of the written tensors.
        #[arg(long, value_enum, default_value = "fp32")]
        dtype: fapool::backend::Dtype,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print comparison tables from results files; write plots, CSV and JSON; compare two runs.
    Analyze {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write every plot (PNG and SVG) into this directory.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// Write batches.csv and summary.csv into this directory.
        #[arg(long, value_name = "DIR")]
        csv: Option<PathBuf>,
        /// Write the batch and summary rows as one JSON file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Latency limits for goodput, e.g. `ttft=2000ms,tpot=200ms`, or an MLPerf preset such as `mlperf-llama2-70b`.
        #[arg(long)]
        slo: Option<String>,
        /// Compare two results files (A B): each metric's change with its confidence interval.
        #[arg(long)]
        compare: bool,
        /// With --compare: compare runs of different models or dtypes anyway.
        #[arg(long)]
        force: bool,
    },
    /// Check a results file: schema, provenance and internal consistency (exit 8 listing every problem).
    Check { file: PathBuf },
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
    /// Time the planner on FA Pool deployments of several sizes (dense-4l, one long sequence).
    Plan {
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
        gpus: Vec<usize>,
        #[arg(long, default_value_t = 1 << 20)]
        seq: usize,
        /// Cluster file (default: H200s, 8 per node).
        #[arg(long)]
        cluster: Option<PathBuf>,
    },
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
    /// FA Pool's base and pool layer work timed apart (base 1 + pool 1 shapes, each pool_ops and chunk count) beside a TP=2 rank's layer, with predicted TTFTs when bandwidths are given.
    Sides {
        #[arg(long, value_enum, default_value = "cuda")]
        backend: BackendKind,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: fapool::backend::Dtype,
        /// Model preset.
        #[arg(long, default_value = "dense-4l")]
        model: String,
        /// Prompt lengths (one sequence).
        #[arg(long, value_delimiter = ',', default_value = "32768,65536")]
        seq: Vec<usize>,
        /// Chunk counts.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        chunks: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Point-to-point bandwidth between the two devices (GB/s), for the FA Pool predictions.
        #[arg(long)]
        link_gbs: Option<f64>,
        /// All-reduce algorithm bandwidth of two devices (GB/s), for the TP=2 prediction.
        #[arg(long)]
        allreduce_gbs: Option<f64>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One mixture-of-experts FFN layer (router, top-k, expert slots, permutation, one GEMM per expert up and down, weighted combine) over token counts, beside PyTorch's times of the same layer when given.
    Moe {
        #[arg(long, value_enum, default_value = "cuda")]
        backend: BackendKind,
        #[arg(long, value_enum, default_value = "fp16")]
        dtype: fapool::backend::Dtype,
        /// Model preset (one with experts).
        #[arg(long, default_value = "moe-16l")]
        model: String,
        /// Tokens of the layer.
        #[arg(long, value_delimiter = ',', default_value = "128,4096,16384,65536")]
        tokens: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// PyTorch's times of the same layer (`scripts/torch_reference.py moe --out FILE`).
        #[arg(long, value_name = "FILE")]
        reference: Option<PathBuf>,
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
    let outcome = match cli.cmd {
        Cmd::Run { job, out, force, resume, timeout, trace, trace_batches, backend, set, calibration } => {
            let trace = trace.map(|dir| fapool::runner::timeline::TraceSpec { dir, batches: trace_batches });
            commands::run::run(&job, RunArgs { out, resume, force, backend, timeout_s: timeout, trace, calibration }, &set)
        }
        Cmd::Plan { job, cluster, calibration, seq, gpus, batch, decode_steps, dot, trace, per_gpu, check, search, objective, vary, set } => {
            commands::plan::plan(PlanArgs { job, cluster, calibration, seq, gpus, batch, decode_steps, dot, trace, check, search, objective, vary, sets: set, per_gpu })
        }
        Cmd::Calibrate { out, backend, dtype, comm, job } => commands::calibrate::calibrate(CalibrateArgs { out, backend, dtype, comm, job }),
        Cmd::Validate { job, ranks, local_ranks, gpus, memory_gib, set } => commands::validate::validate(&job, ValidateArgs { ranks, local_ranks, gpus, memory_gib }, &set),
        Cmd::Verify { job, backend, set, tolerance, teacher_forcing, max_batches, reference } => {
            commands::verify::verify(&job, VerifyArgs { backend, tolerance, teacher_forcing, max_batches, reference }, &set)
        }
        Cmd::Analyze { files, plots, csv, json, slo, compare, force } => commands::analyze::analyze(&fapool::analyze::AnalyzeArgs { files, plots, csv, json, slo, compare, force }),
        Cmd::ExportWeights { job, out, dtype, set } => commands::export::export_weights(&job, &out, dtype, &set),
        Cmd::Check { file } => commands::analyze::check(&file),
        Cmd::Env => commands::env::env(),
        Cmd::Bench { what: BenchCmd::Kernels { dtype, seq, iters, out } } => commands::bench::kernels(dtype, &seq, iters, out.as_deref()),
        Cmd::Bench { what: BenchCmd::Sides { backend, dtype, model, seq, chunks, iters, link_gbs, allreduce_gbs, out } } => {
            commands::bench::sides(backend, dtype, &model, &fapool::bench::sides::SidesArgs { seq, chunks, iters, link_gbs, allreduce_gbs }, out.as_deref())
        }
        Cmd::Bench { what: BenchCmd::Moe { backend, dtype, model, tokens, iters, reference, out } } => {
            commands::bench::moe(backend, dtype, &model, &tokens, iters, reference.as_deref(), out.as_deref())
        }
        Cmd::Bench { what: BenchCmd::Comm { backend, dtype, sizes_mib, iters, out } } => commands::bench::comm(backend, dtype, &sizes_mib, iters, out.as_deref()),
        Cmd::Bench { what: BenchCmd::Plan { gpus, seq, cluster } } => commands::bench::plan_scale(&gpus, seq, cluster.as_deref()),
        Cmd::CheckGpu { dtype, seed } => commands::check_gpu::check_gpu(&dtype, seed),
    };
    std::process::exit(commands::finish(outcome));
}
