//! Configuration search: for each GPU budget and sequence length, every
//! combination of a search space's settings is planned and ranked by the
//! objective; the best baseline and the best FA Pool configuration are
//! reported with their runners-up, and per budget the crossover.
//!
//! The space is a list of spec fields by name with candidate values, applied
//! to the strategy's TOML table, so a setting joins the search by its name:
//! a field the strategy does not have (yet) is reported and left out rather
//! than guessed at. `--vary FIELD=v1,v2` (TOML values) adds or replaces a
//! field's candidates. Candidates that break a rule, need more GPUs than the
//! budget or do not fit in memory are counted and skipped.

use super::compare::{self, Objective, Planned};
use super::report::ms;
use super::report::Prediction;
use super::{cost_model, PlanError, Planner};
use crate::model::ModelConfig;
use crate::rules::violation;
use crate::spec::{JobSpec, StrategySpec};
use crate::strategy::BatchShape;
use toml::Value;

/// One field of a search space and its candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub field: String,
    pub values: Vec<Value>,
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// The default space of `kind` for a budget of `gpus` at length `s`.
pub fn default_space(kind: &str, cfg: &ModelConfig, gpus: usize, s: usize) -> Vec<Axis> {
    let int = |v: Vec<usize>| v.into_iter().map(|x| Value::Integer(x as i64)).collect::<Vec<_>>();
    let tps: Vec<usize> = divisors(cfg.heads).into_iter().filter(|t| cfg.ffn % t == 0 && *t <= gpus).collect();
    match kind {
        "baseline" => vec![Axis { field: "tp".into(), values: int(tps) }, Axis { field: "pp".into(), values: int(divisors(cfg.layers).into_iter().filter(|p| *p <= gpus).collect()) }],
        "fapool" => vec![
            Axis { field: "base".into(), values: int(tps.into_iter().filter(|b| *b < gpus).collect()) },
            // 0 activates the pool at this length; `s` keeps the base alone.
            Axis { field: "threshold".into(), values: int(vec![0, s]) },
            Axis { field: "tokens_per_pool_gpu".into(), values: int(vec![512, 1024, 2048]) },
            Axis { field: "partition".into(), values: vec![Value::String("contiguous".into()), Value::String("zigzag".into())] },
            Axis { field: "micro_batches".into(), values: int(vec![1, 2]) },
            Axis { field: "chunks".into(), values: int(vec![1, 2, 4, 8]) },
            Axis { field: "aggregation".into(), values: vec![Value::String("tree".into()), Value::String("direct".into())] },
        ],
        _ => Vec::new(),
    }
}

/// Splits `FIELD=v1,v2,...` (commas inside brackets or quotes stay).
pub fn parse_vary(text: &str) -> Result<Axis, PlanError> {
    let bad = || PlanError::Rule(violation("search-vary-valid", format!("--vary {text}: expected FIELD=v1,v2,... with TOML values")));
    let (field, rest) = text.split_once('=').ok_or_else(bad)?;
    let (mut parts, mut cur, mut depth, mut quoted) = (Vec::new(), String::new(), 0i32, false);
    for ch in rest.chars() {
        match ch {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if depth == 0 && !quoted => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    parts.push(cur);
    let values = parts.iter().map(|p| toml::from_str::<toml::Table>(&format!("v = {}", p.trim())).ok().and_then(|mut t| t.remove("v"))).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
    Ok(Axis { field: field.trim().to_string(), values })
}

fn with(table: &toml::Table, sets: &[(&str, &Value)]) -> Result<StrategySpec, String> {
    let mut t = table.clone();
    t.remove("name");
    for (k, v) in sets {
        t.insert(k.to_string(), (*v).clone());
    }
    Value::Table(t).try_into().map_err(|e: toml::de::Error| e.to_string())
}

/// The fields of `space` that `template` accepts, and the note for each it does not.
fn usable(template: &toml::Table, space: Vec<Axis>) -> (Vec<Axis>, Vec<String>) {
    let (mut keep, mut notes) = (Vec::new(), Vec::new());
    for a in space {
        match a.values.first().map(|v| with(template, &[(&a.field, v)])) {
            Some(Err(e)) if e.contains("unknown field") => notes.push(format!("`{}` is not a setting of {} yet: not searched", a.field, template.get("kind").and_then(Value::as_str).unwrap_or("?"))),
            Some(_) => keep.push(a),
            None => {}
        }
    }
    (keep, notes)
}

/// Every combination of the axes' values.
fn combinations(axes: &[Axis]) -> Vec<Vec<(&str, &Value)>> {
    let mut out: Vec<Vec<(&str, &Value)>> = vec![Vec::new()];
    for a in axes {
        out = out.into_iter().flat_map(|c| a.values.iter().map(move |v| [c.clone(), vec![(a.field.as_str(), v)]].concat())).collect();
    }
    out
}

fn describe(sets: &[(&str, &Value)]) -> String {
    sets.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// The template of each kind: the job's first strategy of that kind, else a minimal one.
fn templates(job: &JobSpec) -> Vec<toml::Table> {
    StrategySpec::KINDS
        .iter()
        .map(|kind| {
            job.strategies.iter().find(|s| s.kind() == *kind).and_then(|s| toml::Table::try_from(s).ok()).unwrap_or_else(|| {
                let mut t = toml::Table::new();
                t.insert("kind".into(), Value::String(kind.to_string()));
                t
            })
        })
        .collect()
}

/// What to search.
#[derive(Clone, Debug)]
pub struct SearchArgs<'a> {
    pub cluster: Option<&'a std::path::Path>,
    pub calibration: Option<&'a std::path::Path>,
    /// GPU budgets.
    pub gpus: &'a [usize],
    pub seq: &'a [usize],
    pub batch: Option<usize>,
    pub decode_steps: usize,
    pub objective: Objective,
    /// `FIELD=v1,v2` overrides of the space.
    pub vary: &'a [String],
}

/// `fapool plan JOB --search`.
pub fn run(job: &JobSpec, cfg: &ModelConfig, args: &SearchArgs<'_>) -> Result<(), PlanError> {
    let objective = args.objective;
    if args.gpus.is_empty() || args.seq.is_empty() {
        return Err(violation("search-needs-budget", "--search needs --gpus N[,M...] and --seq S[,...]").into());
    }
    let extra: Vec<Axis> = args.vary.iter().map(|v| parse_vary(v)).collect::<Result<_, _>>()?;
    for &gpus in args.gpus {
        let cost = cost_model(job, args.cluster, args.calibration, gpus)?;
        cost.cluster.check_deployment(gpus)?;
        let planner = Planner { job, cfg, cost: &cost, world: gpus, decode_steps: args.decode_steps };
        let mut best_points: Vec<Planned> = Vec::new();
        for &s in args.seq {
            let nseq = args.batch.unwrap_or_else(|| super::batch_at(job, cfg.vocab, s));
            let shape = BatchShape { nseq, seq_len: s, out_tokens: job.workload.output_tokens };
            println!("\nsearch: {gpus} GPUs ({}), {s} tokens x {nseq} sequences, objective {}", cost.source, objective.name());
            for template in templates(job) {
                let kind = template.get("kind").and_then(Value::as_str).unwrap_or("?").to_string();
                // Only the kinds that serve this model's FFN (dense or mixture of experts).
                if with(&template, &[]).is_ok_and(|spec| spec.deployment().serves_experts() != cfg.experts.is_some()) {
                    continue;
                }
                let mut space = default_space(&kind, cfg, gpus, s);
                for e in &extra {
                    space.retain(|a| a.field != e.field);
                    space.push(e.clone());
                }
                let (axes, notes) = usable(&template, space);
                for n in notes {
                    println!("  note: {n}");
                }
                let mut ranked: Vec<(f64, String, Prediction)> = Vec::new();
                let (mut broken, mut unfit) = (0usize, 0usize);
                for mut sets in combinations(&axes) {
                    // FA Pool's pool takes every GPU the base leaves.
                    let base = sets.iter().find(|(k, _)| *k == "base").and_then(|(_, v)| v.as_integer()).unwrap_or(1);
                    let pool_max = Value::Integer(gpus as i64 - base);
                    if kind == "fapool" {
                        sets.push(("pool_max", &pool_max));
                    }
                    let Ok(spec) = with(&template, &sets) else {
                        broken += 1;
                        continue;
                    };
                    let r = spec.deployment().rank_range();
                    if spec.deployment().check(cfg).is_err() || r.min > gpus || (kind == "baseline" && r.max > gpus) {
                        broken += 1;
                        continue;
                    }
                    match planner.point(&spec, shape) {
                        Ok(pt) => ranked.push((objective.cost(&pt.prediction), describe(&sets), pt.prediction)),
                        Err(e) if e.is_bad_input() => unfit += 1,
                        Err(e) => return Err(e),
                    }
                }
                ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
                println!("  {kind}: {} candidates planned, {broken} break a rule or the budget, {unfit} do not fit in memory", ranked.len());
                // Distinct outcomes only: settings that plan the same batch identically are counted with the first.
                let mut shown: Vec<(&str, &Prediction, usize)> = Vec::new();
                for (_, what, p) in &ranked {
                    match shown.iter().position(|(_, q, _)| (q.ttft_s, q.tpot_s, q.tps) == (p.ttft_s, p.tpot_s, p.tps)) {
                        Some(i) => shown[i].2 += 1,
                        None if shown.len() < 4 => shown.push((what, p, 0)),
                        None => {}
                    }
                }
                for (i, (what, p, same)) in shown.iter().enumerate() {
                    let tag = if i == 0 { "best" } else { "    " };
                    let alike = if *same > 0 { format!("  (+{same} alike)") } else { String::new() };
                    println!("    {tag} {what:<72} TTFT {:>9} ms  TPOT {:>9} ms  TPS {:>10.0}  pool {}{alike}", ms(p.ttft_s), ms(p.tpot_s), p.tps, p.setup.pool_effective);
                }
                if let Some((_, what, p)) = ranked.into_iter().next() {
                    best_points.push(Planned { strategy: format!("best {kind} ({what})"), kind: kind.clone(), prediction: p });
                }
            }
        }
        // The crossover between the best of each kind at each length.
        let by_kind: Vec<Planned> = best_points.iter().map(|p| Planned { strategy: format!("best {}", p.kind), ..p.clone() }).collect();
        if let Some((reference, challengers)) = compare::pairs(&by_kind) {
            for c in challengers {
                match compare::crossover(&by_kind, &reference, &c, objective) {
                    Some(s) => println!("crossover ({gpus} GPUs, {}): the best FA Pool beats the best baseline from {s} tokens on", objective.name()),
                    None => println!("crossover ({gpus} GPUs, {}): the best FA Pool does not stay ahead at the lengths searched", objective.name()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_values_are_toml_and_commas_inside_arrays_stay() {
        let a = parse_vary("pool_ops=[\"qkv\",\"attention\"],[\"attention\"]").unwrap();
        assert_eq!(a.field, "pool_ops");
        assert_eq!(a.values.len(), 2);
        assert_eq!(parse_vary("chunks=1,4").unwrap().values, vec![Value::Integer(1), Value::Integer(4)]);
        assert!(parse_vary("chunks").is_err());
    }

    #[test]
    fn a_field_the_strategy_lacks_is_left_out_by_name() {
        let mut t = toml::Table::new();
        t.insert("kind".into(), Value::String("baseline".into()));
        t.insert("tp".into(), Value::Integer(1));
        t.insert("pp".into(), Value::Integer(1));
        let space = vec![Axis { field: "micro_batches".into(), values: vec![Value::Integer(2)] }, Axis { field: "no_such_setting".into(), values: vec![Value::Integer(1)] }];
        let (keep, notes) = usable(&t, space);
        assert_eq!(keep.len(), 1);
        assert!(notes[0].contains("no_such_setting"), "{notes:?}");
    }
}
