//! Tables of small files written through the results module.

use super::*;
use crate::metrics::CategorySummary;
use crate::results::tests::{batch, provenance, ranks, strategy, write_run, TempPath};
use crate::results::ResultsFile;

fn analyze_to_string(path: &Path) -> String {
    let mut out = Vec::new();
    analyze(&AnalyzeArgs { files: vec![path.to_path_buf()], ..Default::default() }, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// The cells of `strategy`'s row in the comparison table of `category`.
fn row<'a>(text: &'a str, category: &str, strategy: &str) -> Vec<&'a str> {
    let section = text.split(&format!("-- {category}:")).nth(1).expect("category section");
    let line = section.lines().find(|l| l.split_whitespace().next() == Some(strategy)).expect("strategy row");
    line.split_whitespace().collect()
}

#[test]
fn improvement_is_baseline_tpot_over_fapool_tpot_and_fapool_tps_over_baseline_tps() {
    let path = TempPath::new("analyze-improvement");
    // TPOT 2 ms vs 1 ms; E2E = 10 ms + 2 × TPOT, so TPS improves by 14/12.
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004]), ("fapool", "fapool", [0.001, 0.002])]);
    let text = analyze_to_string(&path.0);
    let fapool = row(&text, "short", "fapool");
    assert_eq!(fapool[12..14], ["2.00×", "1.17×"], "{text}");
    let baseline = row(&text, "short", "baseline");
    assert_eq!(baseline[12..14], ["-", "-"], "{text}");
    assert_eq!(fapool[5], "1.00", "TPOT median in ms\n{text}");
}

#[test]
fn two_batches_are_marked_unstable() {
    let path = TempPath::new("analyze-unstable");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let text = analyze_to_string(&path.0);
    assert!(row(&text, "short", "baseline").join(" ").ends_with("TPOT 2 batches < 3"), "{text}");
}

#[test]
fn energy_not_measured_prints_as_not_measured() {
    let path = TempPath::new("analyze-energy");
    {
        let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
        f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
        let b = batch(0, 512, 0.002);
        f.append_batch("baseline", "short", &b, &ranks(0, None)).unwrap();
        f.write_summary("baseline", "short", &CategorySummary::from_batches(&[b], 0.014)).unwrap();
    }
    let text = analyze_to_string(&path.0);
    let summary = text.split("\nsummary\n").nth(1).unwrap();
    let line = summary.lines().find(|l| l.starts_with("baseline")).unwrap();
    assert!(line.ends_with("n/m"), "{text}");
}

#[test]
fn a_category_without_summary_is_summarised_from_its_batches_and_marked() {
    let path = TempPath::new("analyze-partial");
    {
        let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
        f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
        f.append_batch("baseline", "medium", &batch(0, 4096, 0.004), &ranks(0, Some(1.0))).unwrap();
    }
    let text = analyze_to_string(&path.0);
    assert_eq!(row(&text, "medium", "baseline*")[5], "4.00", "{text}");
    assert!(text.contains("no stored summary"), "{text}");
}

#[test]
fn communication_breakdown_lists_each_category_used() {
    let path = TempPath::new("analyze-comm");
    write_run(&path.0, &[("fapool", "fapool", [0.001, 0.002])]);
    let text = analyze_to_string(&path.0);
    let section = text.split("communication (short)").nth(1).unwrap();
    let kv = section.lines().find(|l| l.contains("kv_replication")).expect("kv_replication row");
    // 2 batches × 4 ranks × 2 calls of 3 MiB in 20 ms each.
    let cells: Vec<&str> = kv.split_whitespace().collect();
    assert_eq!(cells[5], "16", "{text}");
    assert_eq!(cells[6], "0.157", "{text}");
    assert!(!section.split("-- ").next().unwrap().contains("pool_scatter"), "{text}");
}

#[test]
fn predictions_are_shown_beside_measurements() {
    let path = TempPath::new("analyze-prediction");
    write_run(&path.0, &[("fapool", "fapool", [0.001, 0.002])]);
    ResultsFile::open_existing(&path.0).unwrap().store_prediction("fapool", "short", "tpot_s", 0.0011).unwrap();
    let text = analyze_to_string(&path.0);
    let line = text.lines().find(|l| l.contains("tpot_s")).expect("prediction row");
    assert!(line.ends_with("+10.0"), "{line}");
}

#[test]
fn goodput_counts_the_sequences_whose_batch_met_both_limits() {
    let path = TempPath::new("analyze-goodput");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let mut out = Vec::new();
    let args = AnalyzeArgs { files: vec![path.0.clone()], slo: Some("ttft=20ms,tpot=3ms".into()), ..Default::default() };
    analyze(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    // short: TPOT 2 ms meets 3 ms; medium: 4 ms does not.
    assert_eq!(row(&text, "short", "baseline")[12], "100.0", "{text}");
    assert_eq!(row(&text, "medium", "baseline")[12], "0.0", "{text}");
}

#[test]
fn no_input_is_a_usage_error() {
    let e = analyze(&AnalyzeArgs::default(), &mut Vec::new()).unwrap_err();
    assert!(matches!(e, AnalyzeError::NoInput));
    assert_eq!(e.exit(), Exit::Usage);
}

#[test]
fn a_bad_slo_is_a_usage_error_naming_the_presets() {
    let path = TempPath::new("analyze-bad-slo");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let e = analyze(&AnalyzeArgs { files: vec![path.0.clone()], slo: Some("ttft=1s".into()), ..Default::default() }, &mut Vec::new()).unwrap_err();
    assert_eq!(e.exit(), Exit::Usage);
    assert!(e.to_string().contains("mlperf-llama2-70b"), "{e}");
}

#[test]
fn the_checker_lists_every_inconsistency_of_a_synthetic_file() {
    // The fixture's rank rows carry 0.3e12 FLOPs each against 1.5e12 per
    // batch, for 4 ranks of a 1-device world: each of those is reported.
    let path = TempPath::new("check-synthetic");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let report = check::check(&path.0).unwrap();
    let flops = report.problems.iter().filter(|p| p.contains("rank flops add up to 1.2e12, the batch records 1.5e12")).count();
    assert_eq!(flops, 4, "{:?}", report.problems);
    assert!(report.problems.iter().any(|p| p == "provenance: 1 devices for 4 ranks on the cuda backend"), "{:?}", report.problems);
    assert!(report.checks > report.problems.len());
}

#[test]
fn idle_share_is_printed_per_role() {
    let path = TempPath::new("analyze-idle");
    write_run(&path.0, &[("fapool", "fapool", [0.001, 0.002])]);
    let text = analyze_to_string(&path.0);
    let section = text.split("where the time goes (short)").nth(1).unwrap().split("\n\n").next().unwrap();
    let cells =
        |role: &str| section.lines().find(|l| l.split_whitespace().nth(1) == Some(role)).unwrap_or_else(|| panic!("no {role} row: {text}")).split_whitespace().map(str::to_string).collect::<Vec<_>>();
    // Two batches of two base ranks waiting 0.05 s of 0.5 s; one pool rank
    // active likewise, the other outside the pool (wholly idle).
    assert_eq!(cells("base")[2..], ["2", "1.80", "0.200", "10.0", "10.0"], "{text}");
    assert_eq!(cells("pool")[2..], ["2", "1.80", "0.200", "55.0", "100.0"], "{text}");
}
