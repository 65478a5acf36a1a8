//! `fapool bench`: commands that measure and report. `bench kernels` times
//! the model's kernels on one GPU (GEMMs on dense-4l's shapes, prefill
//! attention 4K–64K, decode attention); `bench comm` times the collectives
//! and point-to-point messages through the communication layer over message
//! sizes, on every rank of the launch (NCCL on GPUs, MPI on the CPU backend).
//! Both print a table and can write it to HDF5.

use crate::backend::Backend;
use crate::comm::{Category, Comm, Group};
use hdf5::types::VarLenUnicode;

/// One measured row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub what: String,
    pub shape: String,
    pub median_ms: f64,
    pub figure: f64,
    pub unit: String,
    /// Bus bandwidth (GB/s) for collectives, nccl-tests' definition; NaN otherwise.
    pub busbw_gbs: f64,
}

#[derive(hdf5::H5Type, Clone)]
#[repr(C)]
struct H5Row {
    what: VarLenUnicode,
    shape: VarLenUnicode,
    median_ms: f64,
    figure: f64,
    unit: VarLenUnicode,
    busbw_gbs: f64,
}

fn vlen(s: &str) -> VarLenUnicode {
    s.parse().unwrap_or_default()
}

/// Writes rows to `path` as the compound dataset `/bench` (attrs: device, kind).
pub fn write_h5(path: &std::path::Path, kind: &str, device: &str, rows: &[Row]) -> hdf5::Result<()> {
    let f = hdf5::File::create(path)?;
    let data: Vec<H5Row> = rows.iter().map(|r| H5Row { what: vlen(&r.what), shape: vlen(&r.shape), median_ms: r.median_ms, figure: r.figure, unit: vlen(&r.unit), busbw_gbs: r.busbw_gbs }).collect();
    let ds = f.new_dataset_builder().with_data(&data).create("bench")?;
    ds.new_attr::<VarLenUnicode>().create("kind")?.write_scalar(&vlen(kind))?;
    ds.new_attr::<VarLenUnicode>().create("device")?.write_scalar(&vlen(device))?;
    Ok(())
}

pub fn print_table(rows: &[Row]) {
    println!("{:<34} {:<30} {:>11} {:>10} {:<8} {:>10}", "operation", "shape", "median ms", "figure", "unit", "busbw GB/s");
    for r in rows {
        let bus = if r.busbw_gbs.is_nan() { "-".to_string() } else { format!("{:.1}", r.busbw_gbs) };
        println!("{:<34} {:<30} {:>11.4} {:>10.1} {:<8} {:>10}", r.what, r.shape, r.median_ms, r.figure, r.unit, bus);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times each collective over `sizes` bytes per rank: `warmup` untimed then
/// `iters` timed calls; the median call time counts. The comm layer's own
/// timing (device marks on GPU) is what is reported, so this measures the
/// same path the strategies use.
pub fn bench_comm<B: Backend>(be: &B, comm: &Comm<'_, B>, world: &Group, sizes: &[usize], warmup: usize, iters: usize) -> crate::comm::Result<Vec<Row>> {
    let n = world.size();
    let me = world.rank();
    let mut rows = Vec::new();
    let elem = {
        let one = be.zeros(1)?;
        be.size_bytes(&one)
    };
    let per_call = |stats: std::collections::BTreeMap<Category, crate::comm::CommStat>, c: Category| stats.get(&c).map(|s| s.seconds / s.calls.max(1) as f64).unwrap_or(f64::NAN);
    for &bytes in sizes {
        let len = (bytes / elem).max(1);
        let mut buf = be.upload(&vec![1.0f32; len])?;
        let mut record = |what: &str, factor: f64, moved: f64, op: &mut dyn FnMut(&mut B::Buf) -> crate::comm::Result<()>, cat: Category, buf: &mut B::Buf| -> crate::comm::Result<()> {
            for _ in 0..warmup {
                op(buf)?;
            }
            be.synchronize()?;
            comm.take_stats()?;
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                op(buf)?;
                times.push(per_call(comm.take_stats()?.0.by_category, cat));
            }
            let t = median(times);
            let algbw = moved * (len * elem) as f64 / t / 1e9;
            rows.push(Row { what: what.into(), shape: format!("{} MiB x {n} ranks", (len * elem) >> 20), median_ms: t * 1e3, figure: algbw, unit: "GB/s alg".into(), busbw_gbs: algbw * factor });
            Ok(())
        };
        let nf = n as f64;
        record("all_reduce", 2.0 * (nf - 1.0) / nf, 1.0, &mut |b| comm.all_reduce(Category::TpAllreduce, world, b), Category::TpAllreduce, &mut buf)?;
        record("broadcast", 1.0, 1.0, &mut |b| comm.broadcast(Category::AttentionSync, world, 0, b), Category::AttentionSync, &mut buf)?;
        // all_gather: `bytes` per rank; like nccl-tests, bandwidth counts the gathered size, bus factor (n-1)/n.
        let gather_src = be.upload(&vec![1.0f32; len])?;
        let mut sink = be.zeros(0)?;
        record("all_gather (per-rank size)", (nf - 1.0) / nf, nf, &mut |_b| comm.all_gather(Category::KvReplication, world, &gather_src).map(|_| ()), Category::KvReplication, &mut sink)?;
        if n > 1 {
            record(
                "send/recv (rank 0 -> 1)",
                1.0,
                1.0,
                &mut |b| match me {
                    0 => comm.send(Category::PpP2p, world, 1, b),
                    1 => comm.recv_into(Category::PpP2p, world, 0, b),
                    _ => Ok(()),
                },
                Category::PpP2p,
                &mut buf,
            )?;
        }
    }
    Ok(rows)
}
