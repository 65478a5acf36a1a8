//! The contract against the kernel sources: a small reader of the subset of
//! C the `.cu` files use at their top level (`#define`s, function-like
//! macros with `##`, `extern "C" __global__` declarations), then one test
//! per part of the contract.

use super::*;
use std::collections::HashMap;

/// A `#define`: `params` is `None` for an object-like macro.
#[derive(Clone, Debug)]
struct Define {
    params: Option<Vec<String>>,
    body: String,
}

/// A preprocessed source: its macros and its text outside directives.
struct Source {
    defines: HashMap<String, Define>,
    text: String,
}

/// One `extern "C" __global__` kernel of an expanded source.
#[derive(Clone, Debug)]
struct FoundKernel {
    name: String,
    /// `(C type, name)` per parameter, types normalised (`const bf16*`).
    params: Vec<(String, String)>,
    /// The first argument of `__launch_bounds__`, evaluated.
    launch_bound: Option<u64>,
    /// The arguments of the macro whose expansion declared it.
    bindings: HashMap<String, String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Joins continued lines and drops comments.
fn preprocess(src: &str) -> String {
    let joined = src.replace("\\\r\n", " ").replace("\\\n", " ");
    let mut out = String::new();
    let mut rest = joined.as_str();
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map(|j| &rest[i + j + 2..]).unwrap_or("");
    }
    out.push_str(rest);
    out.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

fn parse(src: &str) -> Source {
    let mut defines = HashMap::new();
    let mut text = String::new();
    for line in preprocess(src).lines() {
        let t = line.trim_start();
        if let Some(d) = t.strip_prefix("#define") {
            let d = d.trim_start();
            let name_end = d.find(|c: char| !is_ident(c)).unwrap_or(d.len());
            let name = d[..name_end].to_string();
            let after = &d[name_end..];
            let (params, body) = match after.strip_prefix('(') {
                Some(p) => {
                    let close = p.find(')').expect("macro parameters close");
                    (Some(p[..close].split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()), p[close + 1..].trim().to_string())
                }
                None => (None, after.trim().to_string()),
            };
            defines.insert(name, Define { params, body });
        } else if !t.starts_with('#') {
            text.push_str(line);
            text.push('\n');
        }
    }
    Source { defines, text }
}

/// The text inside the parentheses opening at `s[0]`, and the rest after them.
fn balanced(s: &str) -> (&str, &str) {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (&s[1..i], &s[i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in `{}`", &s[..s.len().min(80)]);
}

/// Splits at top-level commas.
fn split_args(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Replaces whole identifiers by their bindings, then pastes `a ## b`.
fn substitute(body: &str, bindings: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut ident = String::new();
    let mut in_string = false;
    for c in body.chars().chain(std::iter::once(' ')) {
        if !in_string && is_ident(c) {
            ident.push(c);
            continue;
        }
        if !ident.is_empty() {
            out.push_str(bindings.get(&ident).map_or(&ident, |v| v));
            ident.clear();
        }
        if c == '"' {
            in_string = !in_string;
        }
        out.push(c);
    }
    let mut pasted = out.trim_end().to_string();
    while let Some(i) = pasted.find("##") {
        let left = pasted[..i].trim_end().len();
        let right = i + 2 + (pasted[i + 2..].len() - pasted[i + 2..].trim_start().len());
        pasted = format!("{}{}", &pasted[..left], &pasted[right..]);
    }
    pasted
}

/// Expands every function-like macro invocation of `text`, collecting the
/// pieces of text that contain none, each with the arguments of the macro
/// that produced it.
fn expand(src: &Source, text: &str, bindings: &HashMap<String, String>, depth: usize, out: &mut Vec<(String, HashMap<String, String>)>) {
    assert!(depth < 16, "macro expansion does not end");
    let mut plain = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let c = rest.chars().next().expect("not empty");
        if c == '"' {
            let end = rest[1..].find('"').map_or(rest.len(), |i| i + 2);
            plain.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        if !is_ident(c) {
            plain.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        let (ident, after) = rest.split_at(end);
        let invoked = src.defines.get(ident).and_then(|d| d.params.as_ref().map(|p| (d, p)));
        match invoked {
            Some((def, params)) if after.trim_start().starts_with('(') => {
                let (args, tail) = balanced(after.trim_start());
                let args = split_args(args);
                assert_eq!(args.len(), params.len(), "{ident} takes {} arguments", params.len());
                let inner: HashMap<String, String> = params.iter().cloned().zip(args).collect();
                out.push((std::mem::take(&mut plain), bindings.clone()));
                expand(src, &substitute(&def.body, &inner), &inner, depth + 1, out);
                rest = tail;
            }
            _ => {
                plain.push_str(ident);
                rest = after;
            }
        }
    }
    out.push((plain, bindings.clone()));
}

/// Evaluates an integer expression of literals, object-like macros,
/// `+ - * /` and parentheses.
fn eval(src: &Source, expr: &str) -> u64 {
    fn sum(src: &Source, t: &[String], i: &mut usize) -> i64 {
        let mut v = product(src, t, i);
        while *i < t.len() && (t[*i] == "+" || t[*i] == "-") {
            let plus = t[*i] == "+";
            *i += 1;
            let r = product(src, t, i);
            v = if plus { v + r } else { v - r };
        }
        v
    }
    fn product(src: &Source, t: &[String], i: &mut usize) -> i64 {
        let mut v = atom(src, t, i);
        while *i < t.len() && (t[*i] == "*" || t[*i] == "/") {
            let times = t[*i] == "*";
            *i += 1;
            let r = atom(src, t, i);
            v = if times { v * r } else { v / r };
        }
        v
    }
    fn atom(src: &Source, t: &[String], i: &mut usize) -> i64 {
        let tok = t[*i].clone();
        *i += 1;
        if tok == "(" {
            let v = sum(src, t, i);
            assert_eq!(t[*i], ")", "closing parenthesis");
            *i += 1;
            return v;
        }
        tok.parse().unwrap_or_else(|_| {
            let d = src.defines.get(&tok).unwrap_or_else(|| panic!("`{tok}` is not defined"));
            eval(src, &d.body) as i64
        })
    }
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in expr.chars() {
        if is_ident(c) {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                tokens.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                tokens.push(c.to_string());
            }
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    let mut i = 0;
    let v = sum(src, &tokens, &mut i);
    assert_eq!(i, tokens.len(), "`{expr}` is not a plain integer expression");
    u64::try_from(v).expect("non-negative")
}

/// `const T* __restrict__ q` → (`const T*`, `q`).
fn normalise_param(p: &str) -> (String, String) {
    let spaced = p.replace('*', " * ");
    let mut words: Vec<&str> = spaced.split_whitespace().filter(|w| *w != "__restrict__" && *w != "__grid_constant__").collect();
    let name = words.pop().expect("a parameter has a name").to_string();
    let mut ty = String::new();
    for w in words {
        if w == "*" {
            ty.push('*');
        } else {
            if !ty.is_empty() {
                ty.push(' ');
            }
            ty.push_str(w);
        }
    }
    (ty, name)
}

fn kernels_in(src: &Source, text: &str, bindings: &HashMap<String, String>) -> Vec<FoundKernel> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("__global__") {
        assert!(rest[..i].trim_end().ends_with("extern \"C\""), "every kernel is extern \"C\": {}", &rest[i..rest.len().min(i + 80)]);
        let mut s = rest[i + "__global__".len()..].trim_start();
        s = s.strip_prefix("void").expect("kernels return void").trim_start();
        let mut launch_bound = None;
        if let Some(b) = s.strip_prefix("__launch_bounds__") {
            let (args, tail) = balanced(b.trim_start());
            launch_bound = Some(eval(src, &split_args(args)[0]));
            s = tail.trim_start();
        }
        let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
        let name = s[..end].to_string();
        let (params, tail) = balanced(s[end..].trim_start());
        found.push(FoundKernel { name, params: split_args(params).iter().map(|p| normalise_param(p)).collect(), launch_bound, bindings: bindings.clone() });
        rest = tail;
    }
    found
}

/// The source of a kernel file as NVRTC compiles it, and its kernels.
fn read(file: KernelFile) -> (Source, Vec<FoundKernel>) {
    let src = parse(&file.source());
    let mut pieces = Vec::new();
    expand(&src, &src.text, &HashMap::new(), 0, &mut pieces);
    let kernels = pieces.iter().flat_map(|(text, b)| kernels_in(&src, text, b)).collect();
    (src, kernels)
}

/// What disagrees between the declarations of `file` and its source.
fn mismatches(file: KernelFile, decls: &[KernelDecl], found: &[FoundKernel]) -> Vec<String> {
    let mut out = Vec::new();
    let declared: Vec<(Option<Dtype>, &'static str, &KernelDecl)> = decls.iter().filter(|d| d.file == file).flat_map(|d| d.names.all().into_iter().map(move |(t, n)| (t, n, d))).collect();
    for (storage, name, decl) in &declared {
        let Some(k) = found.iter().find(|k| k.name == *name) else {
            out.push(format!("{}: `{name}` is declared but the source has no such kernel", file.file_name()));
            continue;
        };
        let want: Vec<(String, String)> = decl.params.iter().map(|p| (p.ty.spelling(*storage), p.name.to_string())).collect();
        if want != k.params {
            out.push(format!("{}: `{name}` is declared ({}) but the source has ({})", file.file_name(), show(&want), show(&k.params)));
        }
        let bound = match decl.block {
            Block::Exactly(n) | Block::AtMost(n) => Some(n as u64),
            // Whole warps: the limit is the shared arrays', so no bound is declared.
            Block::Any | Block::WholeWarps(_) => None,
        };
        if bound != k.launch_bound {
            out.push(format!("{}: `{name}` is declared for blocks {:?} but its __launch_bounds__ is {:?}", file.file_name(), decl.block, k.launch_bound));
        }
    }
    for k in found {
        if !declared.iter().any(|(_, n, _)| *n == k.name) {
            out.push(format!("{}: kernel `{}` is not declared in the contract", file.file_name(), k.name));
        }
    }
    out
}

fn show(params: &[(String, String)]) -> String {
    params.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn every_kernel_is_declared_with_the_parameters_and_block_size_of_its_source() {
    let mut problems = Vec::new();
    let mut count = 0;
    for file in KernelFile::ALL {
        let (_, found) = read(file);
        count += found.len();
        problems.extend(mismatches(file, ALL, &found));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let declared: usize = ALL.iter().map(|d| d.names.all().len()).sum();
    assert_eq!(count, declared, "every kernel of the sources is declared once");
}

#[test]
fn a_declaration_that_disagrees_with_its_source_is_reported() {
    let (_, found) = read(KernelFile::Norm);
    let mut wrong = RMSNORM.decl();
    // `eps` declared as a u64: the launch would pass 8 bytes where the kernel reads a float.
    let params: Vec<Param> = wrong.params.iter().map(|p| if p.name == "eps" { Param { name: "eps", ty: CType::U64 } } else { *p }).collect();
    wrong.params = Box::leak(params.into_boxed_slice());
    let problems = mismatches(KernelFile::Norm, &[wrong], &found);
    assert_eq!(problems.len(), 3, "{problems:?}"); // one per dtype
    assert!(problems[0].contains("u64 eps") && problems[0].contains("float eps"), "{}", problems[0]);
    // A kernel of the source that is declared nowhere.
    assert!(mismatches(KernelFile::Norm, &[], &found).iter().all(|p| p.contains("not declared")));
}

#[test]
fn the_constants_the_host_relies_on_match_the_sources() {
    let sources: Vec<Source> = KernelFile::ALL.iter().map(|&f| read(f).0).collect();
    for &(name, value) in SOURCE_CONSTANTS {
        let values: Vec<u64> = sources.iter().filter(|s| s.defines.get(name).is_some_and(|d| d.params.is_none())).map(|s| eval(s, name)).collect();
        assert!(!values.is_empty(), "no source defines {name}");
        assert!(values.iter().all(|&v| v == value), "{name}: the sources say {values:?}, the host uses {value}");
    }
}

#[test]
fn kernels_read_the_step_scalars_only_through_their_named_offsets() {
    for file in KernelFile::ALL {
        let text = parse(&file.source()).text;
        for pattern in ["step[", "step +"] {
            for (i, _) in text.match_indices(pattern) {
                let before = text[..i].chars().next_back().unwrap_or(' ');
                if is_ident(before) {
                    continue; // another identifier ending in `step`
                }
                let after = text[i + pattern.len()..].trim_start();
                assert!(after.starts_with("FAPOOL_STEP_"), "{}: `{pattern}{}` reads the step scalars at an unnamed offset", file.file_name(), &after[..after.len().min(20)]);
            }
        }
    }
}

#[test]
fn flash_variants_match_their_instantiations_and_shared_memory() {
    let (src, found) = read(KernelFile::Flash);
    for v in FLASH_VARIANTS {
        for (_, name) in v.kernel.names.all() {
            let k = found.iter().find(|k| k.name == name).unwrap_or_else(|| panic!("{name} not in flash.cu"));
            let arg = |p: &str| eval(&src, k.bindings.get(p).unwrap_or_else(|| panic!("{name}: no {p}")));
            let (d, warps, mf) = (arg("D"), arg("WARPS"), arg("MF"));
            assert_eq!((d, warps, mf), (v.head_dim as u64, v.warps as u64, v.fragments as u64), "{name}");
            // The kernel asserts its layout against FLASH_SMEM_BYTES; the launch asks for this much.
            let def = &src.defines["FLASH_SMEM_BYTES"];
            let inner: HashMap<String, String> = def.params.clone().expect("function-like").into_iter().zip([d.to_string(), warps.to_string(), mf.to_string()]).collect();
            assert_eq!(eval(&src, &substitute(&def.body, &inner)), (v.kernel.shared_bytes)(&flash_args()) as u64, "{name}");
        }
    }
}

#[test]
fn every_tensor_core_block_shape_is_declared_once_at_every_head_dim() {
    for d in FA_HEAD_DIMS {
        for (warps, fragments) in [(8, 1), (4, 1), (4, 2)] {
            let n = FLASH_VARIANTS.iter().filter(|v| (v.head_dim, v.warps, v.fragments) == (d, warps, fragments)).count();
            assert_eq!(n, 1, "head_dim {d}, {warps} warps of {fragments} fragments");
        }
    }
    assert_eq!(FLASH_VARIANTS.len(), 3 * FA_HEAD_DIMS.len());
    // Heads of 128 keep their sizes: 96 KiB for 128 query rows, 80 KiB for 64;
    // narrower heads need proportionally less.
    assert_eq!((flash_shared_bytes(128, 4, 2), flash_shared_bytes(128, 4, 1)), (98_304, 81_920));
    assert_eq!((flash_shared_bytes(64, 8, 1), flash_shared_bytes(32, 8, 1)), (49_152, 24_576));
}

#[test]
fn general_prefill_shared_memory_follows_the_source_formula() {
    let (src, _) = read(KernelFile::Prefill);
    let def = &src.defines["PREFILL_SMEM_BYTES"];
    for d in [1u32, 16, 64, 100, 128, 255, 256] {
        let inner: HashMap<String, String> = def.params.clone().expect("function-like").into_iter().zip([d.to_string()]).collect();
        assert_eq!(eval(&src, &substitute(&def.body, &inner)), prefill_shared_bytes(d) as u64, "head_dim {d}");
    }
}

#[test]
fn bulk_decode_shared_memory_follows_the_source_formula() {
    let (src, _) = read(KernelFile::Decode);
    let def = &src.defines["DECODE_BULK_SMEM_BYTES"];
    for (hg, d, elem) in [(1u32, 8u32, 2u32), (2, 128, 2), (4, 128, 2), (32, 128, 2), (64, 64, 2)] {
        let inner: HashMap<String, String> = def.params.clone().expect("function-like").into_iter().zip([hg.to_string(), d.to_string(), elem.to_string()]).collect();
        assert_eq!(eval(&src, &substitute(&def.body, &inner)), decode_bulk_shared_bytes(hg, d, elem) as u64, "{hg} heads of {d}");
    }
    // 32 heads of 128 in bf16, as an H200 runs it: 192 KiB of rows and the
    // barriers of up to 96 stages (one K/V head for the block's 32).
    assert_eq!(decode_bulk_shared_bytes(32, 128, 2), 198_144);
}

#[test]
fn the_hopper_prefill_kernels_are_built_with_the_exp2_their_names_say() {
    let (_, found) = read(KernelFile::FlashSm90);
    for (kernel, ftz) in [(&FLASH_SM90, "false"), (&FLASH_SM90_FTZ, "true")] {
        for (_, name) in kernel.names.all() {
            let k = found.iter().find(|k| k.name == name).unwrap_or_else(|| panic!("{name} not in flash_sm90.cu"));
            assert_eq!(k.bindings.get("FTZ").map(String::as_str), Some(ftz), "{name}");
        }
    }
}

#[test]
fn the_reader_expands_nested_macros_with_token_pasting() {
    let src = parse("#define EACH(M) M(bf16, bf16) M(float, f32)\n#define K(T, S) extern \"C\" __global__ void __launch_bounds__(2 * W) k_##S(const T* __restrict__ x, \\\n u64 n) {}\n#define W 64\nEACH(K) // two kernels\n");
    let mut pieces = Vec::new();
    expand(&src, &src.text, &HashMap::new(), 0, &mut pieces);
    let found: Vec<FoundKernel> = pieces.iter().flat_map(|(t, b)| kernels_in(&src, t, b)).collect();
    let names: Vec<&str> = found.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k_bf16", "k_f32"]);
    assert_eq!(found[1].params, [("const float*".to_string(), "x".to_string()), ("u64".to_string(), "n".to_string())]);
    assert_eq!(found[0].launch_bound, Some(128));
    assert_eq!(found[0].bindings["S"], "bf16");
}

/// Arguments for evaluating a flash kernel's shared-memory size (which
/// depends on the variant only).
fn flash_args() -> FlashArgs {
    let p = DevPtr::raw(0, super::super::launch::Holds::Elements(Dtype::Bf16));
    FlashArgs { q: p, k: p, v: p, out: p, lse: p, sq: 0, skv: 0, kv_stride: 0, heads: 0, kv_heads: 0, q_offset: 0, scale_log2: 0.0 }
}
