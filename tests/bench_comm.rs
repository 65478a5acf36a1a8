//! `fapool bench comm` on CPU ranks: each collective's result is checked on
//! every rank before it is timed, and the table and the HDF5 file report
//! the wrong elements (none, on a correct transport).

mod common;
use common::*;

/// The `#wrong` column of each collective's row.
fn wrong_column(table: &str, what: &str) -> Option<String> {
    table.lines().find(|l| l.starts_with(what)).and_then(|l| l.split_whitespace().last()).map(str::to_string)
}

#[test]
fn every_collective_is_checked_and_correct_on_three_cpu_ranks() {
    let dir = scratch("bench-comm");
    let h5 = dir.join("bench-comm.h5");
    let out = mpirun(3, &["bench", "comm", "--backend", "cpu", "--sizes-mib", "1", "--iters", "2", "--out", h5.to_str().unwrap()]);
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    for what in ["all_reduce", "broadcast", "all_gather (per-rank size)", "send/recv (rank 0 -> 1)"] {
        assert_eq!(wrong_column(&text, what).as_deref(), Some("0"), "{what}:\n{text}");
    }
    let f = hdf5::File::open(&h5).unwrap();
    assert_eq!(f.dataset("bench").unwrap().shape(), vec![4]);
}
