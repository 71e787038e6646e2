//! Per-step bookkeeping of beam search; the model and the top-k run elsewhere.
//!
//! Protocol, per decoding step (rows are the live hypotheses, `beam_size` per
//! unfinished batch item, item-major):
//! 1. the caller masks [`BeamSearch::banned`] pairs in its log-probabilities,
//! 2. adds [`BeamSearch::cum_scores`] row-wise, views the result as
//!    `(items, beam_size * vocab)` and takes the top `k >= 2 * beam_size` per item,
//! 3. passes those scores and flat indices to [`BeamSearch::step`], which returns
//!    the tokens to feed next, the rows of the old cache to keep (finished items
//!    are dropped) and the new cumulative scores.
//!
//! Selection per item: candidates in order of score (ties: lower flat index first);
//! an EOS candidate ranked below `beam_size` ends that hypothesis, other EOS
//! candidates are ignored; the first `beam_size` non-EOS candidates are the new
//! beams. At `max_len` generated tokens the beams end as they are. An item is done
//! when it holds `beam_size` ended hypotheses, or (no length penalty) when its
//! `n_best`-th best ended score is at least every live score: log-probabilities are
//! at most 0, so no live beam can overtake it. Scores of ended hypotheses are
//! `sum_logprob / length^length_penalty`, length counting the EOS.
//!
//! Sizes come from Python unchecked, so every one is bounded here ([`MAX_ROWS`],
//! [`MAX_LEN`], int64 flat indices) and the state is allocated fallibly: a bad size is
//! an error, never an allocation abort.
use std::cmp::Ordering;

use crate::error::{out_of_range, Result};
use crate::invalid;

/// Most rows (`batch_size * beam_size`) one search keeps: far beyond what a decoder
/// holds, small enough that the bookkeeping (about 100 bytes a row) always fits.
pub const MAX_ROWS: usize = 1 << 20;
/// Largest `max_len` (and `no_repeat_ngram_size`): any int64 count of steps.
pub const MAX_LEN: usize = i64::MAX as usize;

/// An empty vector with room for `n` values, or an error instead of an abort.
fn try_vec<T>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| invalid!("cannot allocate beam-search state for {n} entries"))?;
    Ok(v)
}

/// Settings of one search.
#[derive(Clone, Debug)]
pub struct BeamConfig {
    pub batch_size: usize,
    pub beam_size: usize,
    pub max_len: usize,
    pub eos_id: i64,
    pub length_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub n_best: usize,
}

/// An ended hypothesis: generated tokens without BOS/EOS and its final score.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<i64>,
    pub score: f64,
}

#[derive(Clone, Debug)]
struct Beam {
    tokens: Vec<i64>,
    score: f32,
}

#[derive(Clone, Debug)]
struct Item {
    beams: Vec<Beam>,
    ended: Vec<Hypothesis>,
}

/// What the caller feeds the model next.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Next input token per new row.
    pub tokens: Vec<i64>,
    /// For each new row, the old row whose cache it continues.
    pub reorder: Vec<i64>,
    /// Cumulative log-probability per new row.
    pub cum_scores: Vec<f32>,
}

pub struct BeamSearch {
    cfg: BeamConfig,
    items: Vec<Item>,
    /// Items still searching, in row order.
    live: Vec<usize>,
    steps: usize,
}

impl BeamSearch {
    pub fn new(cfg: BeamConfig) -> Result<BeamSearch> {
        for (name, value) in [("batch_size", cfg.batch_size), ("beam_size", cfg.beam_size)] {
            if !(1..=MAX_ROWS).contains(&value) {
                return Err(out_of_range(name, 1, MAX_ROWS, value));
            }
        }
        if cfg.batch_size * cfg.beam_size > MAX_ROWS {
            return Err(invalid!(
                "batch_size * beam_size must be at most {MAX_ROWS} rows, got {} * {}",
                cfg.batch_size,
                cfg.beam_size
            ));
        }
        if !(1..=MAX_LEN).contains(&cfg.max_len) {
            return Err(out_of_range("max_len", 1, MAX_LEN, cfg.max_len));
        }
        if !(1..=cfg.beam_size).contains(&cfg.n_best) {
            return Err(out_of_range(
                "n_best",
                1,
                format!("beam_size ({})", cfg.beam_size),
                cfg.n_best,
            ));
        }
        if cfg.eos_id < 0 {
            return Err(out_of_range("eos_id", 0, i64::MAX, cfg.eos_id));
        }
        if cfg.no_repeat_ngram_size > MAX_LEN {
            return Err(out_of_range(
                "no_repeat_ngram_size",
                0,
                MAX_LEN,
                cfg.no_repeat_ngram_size,
            ));
        }
        if !cfg.length_penalty.is_finite() {
            return Err(invalid!(
                "length_penalty must be finite, got {}",
                cfg.length_penalty
            ));
        }
        // All beams start from BOS; only the first may expand at step 0.
        let start = |_| Beam {
            tokens: Vec::new(),
            score: f32::NEG_INFINITY,
        };
        let mut items = try_vec(cfg.batch_size)?;
        for _ in 0..cfg.batch_size {
            let mut beams = try_vec(cfg.beam_size)?;
            beams.extend((0..cfg.beam_size).map(start));
            beams[0].score = 0.0;
            items.push(Item {
                beams,
                ended: Vec::new(),
            });
        }
        let mut live = try_vec(cfg.batch_size)?;
        live.extend(0..cfg.batch_size);
        Ok(BeamSearch {
            live,
            items,
            cfg,
            steps: 0,
        })
    }

    pub fn config(&self) -> &BeamConfig {
        &self.cfg
    }

    pub fn is_done(&self) -> bool {
        self.live.is_empty()
    }

    /// Rows the caller's decoder holds now.
    pub fn num_rows(&self) -> usize {
        self.live.len() * self.cfg.beam_size
    }

    /// Cumulative score per live row.
    pub fn cum_scores(&self) -> Vec<f32> {
        self.live
            .iter()
            .flat_map(|&b| self.items[b].beams.iter().map(|beam| beam.score))
            .collect()
    }

    /// `(row, token)` pairs whose choice would repeat an n-gram within a hypothesis.
    pub fn banned(&self) -> (Vec<i64>, Vec<i64>) {
        let n = self.cfg.no_repeat_ngram_size;
        let (mut rows, mut tokens) = (Vec::new(), Vec::new());
        if n == 0 {
            return (rows, tokens);
        }
        let beams = self.live.iter().flat_map(|&b| self.items[b].beams.iter());
        for (row, beam) in beams.enumerate() {
            let h = &beam.tokens;
            if h.len() < n {
                continue; // no complete n-gram to repeat yet
            }
            let prefix = &h[h.len() + 1 - n..];
            for start in 0..=h.len() - n {
                if &h[start..start + n - 1] == prefix {
                    rows.push(row as i64);
                    tokens.push(h[start + n - 1]);
                }
            }
        }
        (rows, tokens)
    }

    fn normalized(&self, score: f32, length: usize) -> f64 {
        let score = f64::from(score);
        if self.cfg.length_penalty == 0.0 {
            score
        } else {
            score / (length.max(1) as f64).powf(self.cfg.length_penalty)
        }
    }

    /// Advances one step from the per-item top-k candidates: `scores` and
    /// `indices` are `(num_live_items, k)` row-major, an index is
    /// `beam * vocab_size + token` within its item.
    pub fn step(
        &mut self,
        scores: &[f32],
        indices: &[i64],
        k: usize,
        vocab_size: usize,
    ) -> Result<StepOutput> {
        let beam = self.cfg.beam_size;
        if self.is_done() {
            return Err(invalid!("step() called after every item finished"));
        }
        // Flat indices are int64: beam_size * vocab_size must fit.
        let limit = beam
            .checked_mul(vocab_size)
            .and_then(|n| i64::try_from(n).ok())
            .filter(|_| vocab_size > 0)
            .ok_or_else(|| {
                out_of_range(
                    "vocab_size",
                    1,
                    format!("{} for beam_size {beam}", i64::MAX as usize / beam),
                    vocab_size,
                )
            })?;
        if usize::try_from(self.cfg.eos_id).map_or(true, |eos| eos >= vocab_size) {
            return Err(invalid!(
                "eos_id {} is outside the vocabulary 0..{vocab_size}",
                self.cfg.eos_id
            ));
        }
        if k == 0 || (k < 2 * beam && k as i64 != limit) {
            return Err(invalid!(
                "need k >= 2 * beam_size = {} candidates per item, got {k}",
                2 * beam
            ));
        }
        let n_items = self.live.len();
        let expected = n_items.checked_mul(k);
        if expected != Some(scores.len()) || expected != Some(indices.len()) {
            return Err(invalid!(
                "expected ({n_items}, {k}) candidate scores and indices for {n_items} live items, got {} and {} values",
                scores.len(),
                indices.len()
            ));
        }
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= limit) {
            return Err(invalid!(
                "candidate index {bad} is outside 0..beam_size*vocab_size = 0..{limit}"
            ));
        }
        if scores.iter().any(|s| s.is_nan()) {
            return Err(invalid!("candidate scores contain NaN"));
        }
        let last_step = self.steps + 1 >= self.cfg.max_len;
        let mut out = StepOutput {
            tokens: Vec::with_capacity(n_items * beam),
            reorder: Vec::with_capacity(n_items * beam),
            cum_scores: Vec::with_capacity(n_items * beam),
        };
        // Nothing changes before every item has its new beams, so an error leaves the
        // search as it was: per live item, its newly ended hypotheses and, unless it is
        // done, its new beams.
        let mut updates: Vec<(usize, Vec<Hypothesis>, Option<Vec<Beam>>)> =
            Vec::with_capacity(n_items);
        for (pos, &b) in self.live.iter().enumerate() {
            let mut order: Vec<usize> = (pos * k..(pos + 1) * k).collect();
            order.sort_by(|&x, &y| {
                scores[y]
                    .total_cmp(&scores[x])
                    .then(indices[x].cmp(&indices[y]))
            });
            let mut ended = Vec::new();
            let mut next: Vec<(usize, Beam)> = Vec::with_capacity(beam);
            for (rank, &c) in order.iter().enumerate() {
                let (parent, token) = (
                    indices[c] as usize / vocab_size,
                    indices[c] % vocab_size as i64,
                );
                let score = scores[c];
                if token == self.cfg.eos_id {
                    if rank < beam && score > f32::NEG_INFINITY {
                        let tokens = self.items[b].beams[parent].tokens.clone();
                        let length = tokens.len() + 1;
                        let score = self.normalized(score, length);
                        ended.push(Hypothesis { tokens, score });
                    }
                    continue;
                }
                let mut tokens = self.items[b].beams[parent].tokens.clone();
                tokens.push(token);
                next.push((parent, Beam { tokens, score }));
                if next.len() == beam {
                    break;
                }
            }
            if next.len() < beam {
                return Err(invalid!(
                    "only {} non-EOS candidates for {beam} beams: pass k >= 2 * beam_size",
                    next.len()
                ));
            }
            let item_done = if last_step {
                for (_, beam_state) in &next {
                    if beam_state.score > f32::NEG_INFINITY {
                        let length = beam_state.tokens.len();
                        let score = self.normalized(beam_state.score, length);
                        ended.push(Hypothesis {
                            tokens: beam_state.tokens.clone(),
                            score,
                        });
                    }
                }
                true
            } else {
                self.item_is_done(b, &ended, &next)
            };
            if item_done {
                updates.push((b, ended, None));
                continue;
            }
            for (parent, beam_state) in &next {
                out.tokens
                    .push(*beam_state.tokens.last().expect("a new beam has a token"));
                out.reorder.push((pos * beam + parent) as i64);
                out.cum_scores.push(beam_state.score);
            }
            updates.push((b, ended, Some(next.into_iter().map(|(_, s)| s).collect())));
        }
        let mut still_live = Vec::with_capacity(n_items);
        for (b, ended, beams) in updates {
            self.items[b].ended.extend(ended);
            if let Some(beams) = beams {
                self.items[b].beams = beams;
                still_live.push(b);
            }
        }
        self.live = still_live;
        self.steps += 1;
        Ok(out)
    }

    /// Whether item `b` is done with `new_ended` added to its ended hypotheses.
    fn item_is_done(&self, b: usize, new_ended: &[Hypothesis], next: &[(usize, Beam)]) -> bool {
        let old = &self.items[b].ended;
        let count = old.len() + new_ended.len();
        if count >= self.cfg.beam_size {
            return true;
        }
        if self.cfg.length_penalty != 0.0 || count < self.cfg.n_best {
            return false;
        }
        let mut best: Vec<f64> = old.iter().chain(new_ended).map(|h| h.score).collect();
        best.sort_by(|x, y| y.total_cmp(x));
        let best_live = next
            .iter()
            .map(|(_, s)| f64::from(s.score))
            .fold(f64::NEG_INFINITY, f64::max);
        best[self.cfg.n_best - 1] >= best_live
    }

    /// The `n_best` highest-scoring ended hypotheses of every item, best first
    /// (equal scores: the one that ended first). Call once [`BeamSearch::is_done`].
    pub fn finalize(&self) -> Result<Vec<Vec<Hypothesis>>> {
        if !self.is_done() {
            return Err(invalid!(
                "finalize() called while {} items are still searching",
                self.live.len()
            ));
        }
        Ok(self
            .items
            .iter()
            .map(|item| {
                let mut ended = item.ended.clone();
                ended.sort_by(|x, y| y.score.partial_cmp(&x.score).unwrap_or(Ordering::Equal));
                ended.truncate(self.cfg.n_best);
                ended
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(batch: usize, beam: usize, max_len: usize) -> BeamConfig {
        BeamConfig {
            batch_size: batch,
            beam_size: beam,
            max_len,
            eos_id: 0,
            length_penalty: 0.0,
            no_repeat_ngram_size: 0,
            n_best: 1,
        }
    }

    /// Drives the search with a fixed log-prob table per step (same for all rows).
    fn top_k(search: &BeamSearch, logp: &[f32], k: usize) -> (Vec<f32>, Vec<i64>) {
        let v = logp.len();
        let cum = search.cum_scores();
        let beam = search.config().beam_size;
        let (mut s, mut i) = (Vec::new(), Vec::new());
        for item in cum.chunks(beam) {
            let mut cand: Vec<(f32, i64)> = item
                .iter()
                .enumerate()
                .flat_map(|(j, &c)| {
                    logp.iter()
                        .enumerate()
                        .map(move |(t, &l)| (c + l, (j * v + t) as i64))
                })
                .collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(score, idx) in cand.iter().take(k) {
                s.push(score);
                i.push(idx);
            }
        }
        (s, i)
    }

    #[test]
    fn greedy_path_ends_at_eos() {
        let mut bs = BeamSearch::new(cfg(1, 1, 10)).unwrap();
        let step1 = [-5.0, -0.1, -3.0];
        let (s, i) = top_k(&bs, &step1, 2);
        let out = bs.step(&s, &i, 2, 3).unwrap();
        assert_eq!(out.tokens, vec![1]);
        assert_eq!(out.reorder, vec![0]);
        let eos = [-0.01, -3.0, -3.0];
        let (s, i) = top_k(&bs, &eos, 2);
        let out = bs.step(&s, &i, 2, 3).unwrap();
        assert!(out.tokens.is_empty());
        assert!(bs.is_done());
        let result = bs.finalize().unwrap();
        assert_eq!(result[0][0].tokens, vec![1]);
        assert!((result[0][0].score - (-0.11f32) as f64).abs() < 1e-6);
    }

    #[test]
    fn max_len_ends_all_beams() {
        let mut bs = BeamSearch::new(cfg(2, 2, 2)).unwrap();
        let logp = [-9.0, -0.5, -1.0, -2.0];
        for _ in 0..2 {
            let (s, i) = top_k(&bs, &logp, 4);
            bs.step(&s, &i, 4, 4).unwrap();
        }
        assert!(bs.is_done());
        let result = bs.finalize().unwrap();
        assert_eq!(result.len(), 2);
        assert_eq!(result[0][0].tokens, vec![1, 1]);
    }

    #[test]
    fn banned_pairs_block_repeated_bigrams() {
        let mut c = cfg(1, 1, 10);
        c.no_repeat_ngram_size = 2;
        let mut bs = BeamSearch::new(c).unwrap();
        // Generate 1, 2, 1 -> the bigram (1, 2) is banned next.
        for t in [1usize, 2, 1] {
            let mut logp = vec![-5.0f32; 4];
            logp[t] = -0.1;
            let (s, i) = top_k(&bs, &logp, 2);
            bs.step(&s, &i, 2, 4).unwrap();
        }
        assert_eq!(bs.banned(), (vec![0], vec![2]));
    }

    #[test]
    fn banned_is_empty_before_the_first_full_ngram() {
        let mut c = cfg(1, 1, 10);
        c.no_repeat_ngram_size = 3;
        let mut bs = BeamSearch::new(c).unwrap();
        for t in [1usize, 1] {
            assert_eq!(bs.banned(), (vec![], vec![]));
            let mut logp = vec![-5.0f32; 4];
            logp[t] = -0.1;
            let (s, i) = top_k(&bs, &logp, 2);
            bs.step(&s, &i, 2, 4).unwrap();
        }
        // 1 1 -> the trigram (1, 1, 1) is not there yet.
        assert_eq!(bs.banned(), (vec![], vec![]));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(BeamSearch::new(cfg(0, 1, 1)).is_err());
        let mut c = cfg(1, 2, 3);
        c.n_best = 3;
        assert!(BeamSearch::new(c).is_err());
        let mut bs = BeamSearch::new(cfg(1, 2, 3)).unwrap();
        assert!(bs.step(&[0.0; 4], &[0, 1, 2, 99], 4, 5).is_err());
        assert!(bs.step(&[0.0; 3], &[0, 1, 2], 3, 5).is_err());
        assert!(bs.step(&[f32::NAN; 4], &[0, 1, 2, 3], 4, 5).is_err());
        assert!(bs.finalize().is_err());
    }

    #[test]
    fn a_failed_step_changes_nothing() {
        // Item 0 is fine, item 1 has too few non-EOS candidates: the error comes after
        // item 0 was looked at, and must not have touched it.
        let mut bs = BeamSearch::new(cfg(2, 2, 5)).unwrap();
        let scores = [-0.1, -0.2, -0.3, -0.4, -0.1, -0.2, -0.3, -0.4];
        let bad = [1, 2, 3, 0, 0, 3, 0, 3];
        assert!(bs.step(&scores, &bad, 4, 3).is_err());
        let mut fresh = BeamSearch::new(cfg(2, 2, 5)).unwrap();
        assert_eq!(format!("{:?}", bs.items), format!("{:?}", fresh.items));
        assert_eq!((&bs.live, bs.steps), (&fresh.live, fresh.steps));
        let good = [1, 2, 3, 0, 1, 2, 3, 4];
        assert_eq!(
            bs.step(&scores, &good, 4, 3).unwrap(),
            fresh.step(&scores, &good, 4, 3).unwrap()
        );
        assert_eq!(bs.cum_scores(), fresh.cum_scores());
        assert_eq!(bs.banned(), fresh.banned());
    }

    #[test]
    fn extreme_sizes_are_errors_not_aborts() {
        for (batch, beam) in [
            (1, MAX_ROWS + 1),
            (MAX_ROWS + 1, 1),
            (1 << 11, 1 << 11),
            (usize::MAX, usize::MAX),
        ] {
            let err = BeamSearch::new(cfg(batch, beam, 1)).err().unwrap();
            assert!(err.to_string().contains(&MAX_ROWS.to_string()), "{err}");
        }
        assert!(BeamSearch::new(cfg(1, MAX_ROWS, MAX_LEN)).is_ok());
        assert!(BeamSearch::new(cfg(1, 1, MAX_LEN + 1)).is_err());
        let mut c = cfg(1, 2, 3);
        c.eos_id = -1;
        assert!(BeamSearch::new(c.clone()).is_err());
        c.eos_id = 7;
        let mut bs = BeamSearch::new(c).unwrap();
        let err = bs.step(&[0.0; 4], &[0, 1, 2, 3], 4, 5).unwrap_err();
        assert!(err.to_string().contains("eos_id 7"), "{err}");
        let mut bs = BeamSearch::new(cfg(1, 2, 3)).unwrap();
        for vocab in [0, usize::MAX, usize::MAX / 2, i64::MAX as usize] {
            let err = bs.step(&[0.0; 4], &[0, 1, 2, 3], 4, vocab).unwrap_err();
            assert!(err.to_string().contains("vocab_size"), "{err}");
        }
        assert!(bs.step(&[0.0; 4], &[0, 1, 2, 3], 4, 1 << 40).is_ok());
    }
}
