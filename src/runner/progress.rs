//! Progress of a sweep on rank 0: a bar on a terminal, one `progress:` line
//! per batch in a log file (category, batch, tokens/s, ETA).

/// Progress on rank 0: a bar on a terminal, plain lines in a log file.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    tokens: u64,
}

impl Progress {
    pub fn new(total_batches: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total_batches);
            b.set_style(indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches {msg} ETA {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            b
        });
        Self { bar, started: std::time::Instant::now(), tokens: 0 }
    }

    pub fn batch_done(&mut self, strategy: &str, category: &str, done: u64, total: u64, tokens: u64) {
        self.tokens += tokens;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.tokens as f64 / secs;
        let eta = secs / done.max(1) as f64 * (total.saturating_sub(done)) as f64;
        match &self.bar {
            Some(b) => {
                b.set_prefix(format!("{strategy} {category}"));
                b.set_message(format!("{rate:.0} tok/s"));
                b.set_position(done);
            }
            None => println!("progress: {strategy} {category} batch {done}/{total} {rate:.0} tok/s ETA {eta:.0} s"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
