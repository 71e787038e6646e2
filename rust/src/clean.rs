//! Report cleaning with exactly the output of the reference implementation
//! (R2GenCMN `clean_report_iu_xray` / `clean_report_mimic_cxr`), quirks included.
//!
//! The reference is Python, so three Python string semantics are reproduced here
//! rather than Rust's: `str.isspace` (used by `strip` and `split()`), `str.lower` and
//! `str.split(". ")`. `str.lower` depends on the Unicode version of the interpreter
//! (3.9/3.10: 13.0, 3.11: 14.0, 3.12: 15.0, 3.13: 15.1), which is not Rust's: the
//! binding derives a [`PyCase`] table from the running Python once per process, so
//! the output is the reference's as run by that same interpreter. Quirks kept on
//! purpose, each pinned by a named test:
//! * the punctuation class `[.,?;*!%^&_+():-\[\]{}]` holds the *range* `:-\[`,
//!   so `: ; < = > ? @ [` and `A-Z` are removed while `-` itself is kept;
//! * the "empty sentence" filter compares a string with a list and never filters,
//!   so empty sentences survive as ` . ` runs;
//! * a literal `1. ` is deleted anywhere in the text (also inside `11. ` or `21. `).
use std::sync::{LazyLock, OnceLock};

use memchr::memmem::Finder;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::error::{Error, Result};

/// Which dataset's cleaning rules to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    IuXray,
    MimicCxr,
}

impl Dataset {
    /// Parses the dataset names used on the command line and in configs.
    pub fn parse(name: &str) -> Result<Dataset> {
        match name {
            "iu_xray" => Ok(Dataset::IuXray),
            "mimic_cxr" => Ok(Dataset::MimicCxr),
            other => Err(Error::Invalid(format!(
                "unknown dataset {other:?}: expected \"iu_xray\" or \"mimic_cxr\""
            ))),
        }
    }

    /// The name accepted by [`Dataset::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Dataset::IuXray => "iu_xray",
            Dataset::MimicCxr => "mimic_cxr",
        }
    }
}

/// Python's `str.isspace` for one character; unlike `char::is_whitespace` it
/// includes the information separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Python's `str.strip()` without arguments.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `str.split()` without arguments: runs of whitespace separate tokens,
/// no empty tokens.
pub fn py_split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// How a character takes part in the final-sigma rule of `str.lower` (Unicode
/// section 3.13, the same in Python and Rust): scanning away from a `Σ`, case-ignorable
/// characters are skipped and the first other one decides, by being cased or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaRole {
    /// `Case_Ignorable` (a character that is also cased counts as this: it is skipped).
    Ignorable,
    /// `Cased` and not case-ignorable.
    Cased,
    /// Neither: it ends the scan as a non-cased character.
    Other,
}

/// A set of code points.
#[derive(Clone, Debug, Default)]
struct CharSet(Vec<u64>);

impl CharSet {
    fn insert(&mut self, c: char) {
        let word = c as usize / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (c as usize % 64);
    }

    fn contains(&self, c: char) -> bool {
        self.0
            .get(c as usize / 64)
            .is_some_and(|w| w & (1 << (c as usize % 64)) != 0)
    }
}

/// The running Python's `str.lower`, as a difference to Rust's.
///
/// Python and Rust follow different Unicode versions (3.9/3.10: 13.0, 3.11: 14.0, 3.12:
/// 15.0, 3.13: 15.1; Rust: [`char::UNICODE_VERSION`]), so a character assigned, re-cased
/// or re-classified in between is lowered, or steers the final sigma, differently. The
/// binding derives this table once per process from the interpreter itself
/// ([`case_probe`]): Python's lowercase of each character where it is not Rust's, and
/// Python's [`SigmaRole`] of every character. The cleaner then equals the reference
/// as run by the same Python, whatever its Unicode version.
#[derive(Clone, Debug, Default)]
pub struct PyCase {
    /// Python's lowercase where it differs from `char::to_lowercase`.
    mapping: HashMap<char, Box<str>>,
    /// The keys of `mapping`, for the per-character test.
    mapped: CharSet,
    cased: CharSet,
    ignorable: CharSet,
}

static PY_CASE: OnceLock<PyCase> = OnceLock::new();

/// Every character [`case_probe`] covers: all Unicode scalar values but `'\n'`, the
/// probe's row separator (ASCII, lowered and classified alike everywhere).
pub fn case_probe_chars() -> impl Iterator<Item = char> {
    ('\0'..=char::MAX).filter(|&c| c != '\n')
}

/// Text whose lowercase tells each character's lowercase and [`SigmaRole`]: per
/// character `c` the rows `cΣ` (final sigma only after a cased `c`) and `AcΣ` (not
/// final only after a `c` that is neither cased nor case-ignorable), each ended by
/// `'\n'`, which is neither, so rows do not interact.
pub fn case_probe(chars: &[char]) -> String {
    let mut probe = String::with_capacity(chars.len() * 16);
    for &c in chars {
        for x in [c, 'Σ', '\n', 'A', c, 'Σ', '\n'] {
            probe.push(x);
        }
    }
    probe
}

impl PyCase {
    /// Adds what `python_lowered`, Python's `case_probe(chars).lower()`, tells about
    /// `chars`. Characters never added keep Rust's lowercase and count as neither cased
    /// nor case-ignorable (the binding adds all of them, a slice at a time).
    pub fn add_probe(&mut self, chars: &[char], python_lowered: &str) -> Result<()> {
        let mut rows = python_lowered.split('\n');
        let table = self;
        for &c in chars {
            let (Some(plain), Some(after_cased)) = (rows.next(), rows.next()) else {
                return Err(Error::Invalid("the lowercase probe came back short".into()));
            };
            let bad = || {
                Error::Invalid(format!(
                    "unexpected lowercase probe rows {plain:?}, {after_cased:?} for U+{:04X}",
                    c as u32
                ))
            };
            let lower = plain.strip_suffix(['σ', 'ς']).ok_or_else(bad)?;
            let sigma = after_cased
                .strip_prefix('a')
                .and_then(|rest| rest.strip_prefix(lower))
                .ok_or_else(bad)?;
            if sigma == "ς" {
                if plain.ends_with('ς') {
                    table.cased.insert(c);
                } else {
                    table.ignorable.insert(c);
                }
            } else if sigma != "σ" {
                return Err(bad());
            }
            if !lower.chars().eq(c.to_lowercase()) {
                table.mapping.insert(c, lower.into());
                table.mapped.insert(c);
            }
        }
        Ok(())
    }

    /// Python's role of `c`.
    pub fn role(&self, c: char) -> SigmaRole {
        if self.ignorable.contains(c) {
            SigmaRole::Ignorable
        } else if self.cased.contains(c) {
            SigmaRole::Cased
        } else {
            SigmaRole::Other
        }
    }

    /// The characters Python lowers differently from Rust.
    pub fn remapped(&self) -> impl Iterator<Item = char> + '_ {
        self.mapping.keys().copied()
    }

    /// Whether the first character of `chars` that is not case-ignorable is cased.
    fn cased_after_ignorable<'c>(&self, mut chars: impl Iterator<Item = &'c char>) -> bool {
        chars
            .find(|&&c| !self.ignorable.contains(c))
            .is_some_and(|&c| self.cased.contains(c))
    }

    /// `str.lower` with this table: full case mapping, `Σ` final where it follows a
    /// cased character (case-ignorable ones skipped) and no cased one follows.
    pub fn lower(&self, s: &str) -> String {
        // Without a sigma the roles do not matter, and Rust's mapping is Python's
        // for every character not remapped.
        if !s.chars().any(|c| c == 'Σ' || self.mapped.contains(c)) {
            return s.to_lowercase();
        }
        let chars: Vec<char> = s.chars().collect();
        let mut out = String::with_capacity(s.len());
        for (i, &c) in chars.iter().enumerate() {
            if c == 'Σ' {
                let is_final = self.cased_after_ignorable(chars[..i].iter().rev())
                    && !self.cased_after_ignorable(chars[i + 1..].iter());
                out.push(if is_final { 'ς' } else { 'σ' });
            } else if let Some(lower) = self.mapping.get(&c) {
                out.push_str(lower);
            } else {
                out.extend(c.to_lowercase());
            }
        }
        out
    }
}

/// Makes [`py_lower`] follow `table` from now on (the first table installed stays).
pub fn install_py_case(table: PyCase) {
    let _ = PY_CASE.set(table);
}

/// Whether a Python table is installed (the binding installs one before it cleans
/// text that is not ASCII).
pub fn py_case_installed() -> bool {
    PY_CASE.get().is_some()
}

/// Python's `str.lower()` (full case mapping, final sigma), with the installed
/// [`PyCase`] table; before one is installed (pure Rust use), Rust's own tables.
pub fn py_lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    match PY_CASE.get() {
        Some(table) => table.lower(s),
        None => s.to_lowercase(),
    }
}

/// Checks [`is_py_space`] against Python's own `str.split()` of `all` (text holding
/// every character): `python_pieces` is what Python returned.
pub fn check_py_space(all: &str, python_pieces: &[String]) -> Result<()> {
    let ours: Vec<&str> = py_split_whitespace(all).collect();
    if ours.len() == python_pieces.len() && ours.iter().zip(python_pieces).all(|(a, b)| a == b) {
        return Ok(());
    }
    let kept = |pieces: &mut dyn Iterator<Item = &str>| -> HashSet<char> {
        pieces.flat_map(str::chars).collect()
    };
    let python = kept(&mut python_pieces.iter().map(String::as_str));
    let ours = kept(&mut ours.into_iter());
    let odd = all
        .chars()
        .find(|c| python.contains(c) != ours.contains(c))
        .map_or_else(|| "?".to_owned(), |c| format!("U+{:04X}", c as u32));
    Err(Error::Invalid(format!(
        "this Python's str.isspace() differs from the cleaner's table at {odd}"
    )))
}

/// Characters the reference's regex class `[.,?;*!%^&_+():-\[\]{}]` deletes.
const fn is_removed_punct(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | '?' | ';' | '*' | '!' | '%' | '^' | '&' | '_' | '+' | '(' | ')' | ':'
            ..='[' | ']' | '{' | '}'
    )
}

/// Sentence-stage action per ASCII byte: [`DROP`] = delete (quote, slash or punctuation
/// class), otherwise the lower-cased byte to keep.
const DROP: u8 = 0xff;
static ASCII_KEEP: [u8; 128] = {
    let mut table = [DROP; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8 as char;
        let lower = c.to_ascii_lowercase();
        if !matches!(c, '"' | '/' | '\\' | '\'') && !is_removed_punct(lower) {
            table[b] = lower as u8;
        }
        b += 1;
    }
    table
};

/// Python's `str.isspace` for ASCII bytes.
fn is_py_space_byte(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | 0x1c..=b' ')
}

/// `(pattern, replacement, passes)`: one `str.replace` per pass.
type Rule = (&'static str, &'static str, usize);

/// The numbered-list rules, applied after the dataset's substitutions. Every pattern
/// holds a digit `1..=5` followed by `". "`, and no replacement creates a digit, so
/// text without such a digit before a dot is left alone by all of them.
const LIST_RULES: &[Rule] = &[
    ("1. ", "", 1),
    (". 2. ", ". ", 1),
    (". 3. ", ". ", 1),
    (". 4. ", ". ", 1),
    (". 5. ", ". ", 1),
    (" 2. ", ". ", 1),
    (" 3. ", ". ", 1),
    (" 4. ", ". ", 1),
    (" 5. ", ". ", 1),
];

/// The dataset substitutions, as run collapses. The reference replaces a doubled
/// character by a single one, pass after pass (iu_xray: `..` 3 times; mimic_cxr:
/// `\n` -> space once, then `__` 7 times, `  ` 6 times, `..` 8 times). One pass turns
/// a run of `k` equal characters into `ceil(k / 2)` and never empties a run, so runs
/// of different characters never merge: `p` passes leave `ceil(k / 2^p)`, and all
/// rules can be done in one left-to-right sweep.
struct Collapse {
    /// Per byte: what it becomes (`\n` -> space for mimic_cxr, else itself).
    map: [u8; 256],
    /// Per mapped byte: `2^p - 1` where its runs shrink `2^p`-fold, 0 if copied as is.
    /// Within a run only the characters at offsets `0, 2^p, 2 * 2^p, ...` stay.
    mask: [u8; 256],
}

const fn collapse(newline_is_space: bool, space: u8, underscore: u8, dot: u8) -> Collapse {
    let mut map = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        map[b] = b as u8;
        b += 1;
    }
    if newline_is_space {
        map[b'\n' as usize] = b' ';
    }
    let mut mask = [0u8; 256];
    mask[b' ' as usize] = ((1u16 << space) - 1) as u8;
    mask[b'_' as usize] = ((1u16 << underscore) - 1) as u8;
    mask[b'.' as usize] = ((1u16 << dot) - 1) as u8;
    Collapse { map, mask }
}

static IU_COLLAPSE: Collapse = collapse(false, 0, 0, 3);
static MIMIC_COLLAPSE: Collapse = collapse(true, 6, 7, 8);

impl Collapse {
    fn of(dataset: Dataset) -> &'static Collapse {
        match dataset {
            Dataset::IuXray => &IU_COLLAPSE,
            Dataset::MimicCxr => &MIMIC_COLLAPSE,
        }
    }

    /// Writes the collapsed `text` to `out`; returns whether a numbered-list rule may
    /// match (a digit `1..=5` right before a dot).
    fn apply(&self, text: &[u8], out: &mut Vec<u8>) -> bool {
        // Branch-free (word lengths are unpredictable): every byte is written, only
        // kept ones advance the cursor. The output is never longer than the input.
        out.clear();
        out.resize(text.len(), 0);
        let (mut write, mut run, mut prev, mut last) = (0usize, 0usize, 0u8, 0u8);
        let mut maybe_list = false;
        for &b in text {
            let c = self.map[b as usize];
            run = if c == prev { run.wrapping_add(1) } else { 0 };
            let keep = run & usize::from(self.mask[c as usize]) == 0;
            maybe_list |= (c == b'.') & matches!(last, b'1'..=b'5');
            out[write] = c;
            write += usize::from(keep);
            last = if keep { c } else { last };
            prev = c;
        }
        out.truncate(write);
        maybe_list
    }
}

/// `str.replace(from, to)` done in place on UTF-8 bytes. Every pattern is ASCII and
/// never shorter than its replacement, so the text only shrinks and stays valid
/// UTF-8; matches are found left to right without overlap, as in Python.
fn replace_in_place(buf: &mut Vec<u8>, finder: &Finder<'static>, to: &str) -> bool {
    let (from, to) = (finder.needle().len(), to.as_bytes());
    debug_assert!(to.len() <= from);
    let Some(first) = finder.find(buf) else {
        return false;
    };
    let (mut write, mut read) = (first, first);
    loop {
        buf[write..write + to.len()].copy_from_slice(to);
        write += to.len();
        read += from;
        match finder.find(&buf[read..]) {
            Some(gap) => {
                buf.copy_within(read..read + gap, write);
                write += gap;
                read += gap;
            }
            None => {
                let rest = buf.len() - read;
                buf.copy_within(read.., write);
                write += rest;
                break;
            }
        }
    }
    buf.truncate(write);
    true
}

/// A [`Rule`] with its substring searcher built once.
struct Compiled {
    finder: Finder<'static>,
    to: &'static str,
    passes: usize,
}

static LISTS: LazyLock<Vec<Compiled>> = LazyLock::new(|| {
    LIST_RULES
        .iter()
        .map(|&(from, to, passes)| Compiled {
            finder: Finder::new(from),
            to,
            passes,
        })
        .collect()
});

fn apply_rules(buf: &mut Vec<u8>, rules: &[Compiled]) {
    for rule in rules {
        for _ in 0..rule.passes {
            // A pass that changes nothing makes the following identical passes no-ops.
            if !replace_in_place(buf, &rule.finder, rule.to) {
                break;
            }
        }
    }
}

/// Whole-report stage up to (not including) `strip().lower()`: dataset-specific
/// substitutions, then the numbered-list rules; the result goes to `buf`.
fn substitute(text: &str, dataset: Dataset, buf: &mut Vec<u8>) {
    if Collapse::of(dataset).apply(text.as_bytes(), buf) {
        apply_rules(buf, &LISTS);
    }
}

/// Sentence stage of ASCII text: drop quotes and slashes, strip, lower, delete the
/// punctuation class.
fn ascii_sentence_stage(bytes: &[u8], out: &mut Vec<u8>) {
    // Quotes go first, so `strip` sees through them: skip both at the ends.
    let kept = |b: &u8| !matches!(*b, b'"' | b'/' | b'\\' | b'\'') && !is_py_space_byte(*b);
    let Some(start) = bytes.iter().position(kept) else {
        return;
    };
    let end = bytes.iter().rposition(kept).unwrap_or(start);
    let sentence = &bytes[start..=end];
    // Branch-free: every byte is written, only kept ones advance the cursor.
    let mut len = out.len();
    out.resize(len + sentence.len(), 0);
    for &b in sentence {
        let keep = ASCII_KEEP[b as usize];
        out[len] = keep;
        len += usize::from(keep != DROP);
    }
    out.truncate(len);
}

/// Sentence stage: drop quotes and slashes, strip, lower, delete the punctuation class.
fn sentence_stage(sentence: &str, out: &mut Vec<u8>) {
    if sentence.is_ascii() {
        ascii_sentence_stage(sentence.as_bytes(), out);
        return;
    }
    let is_quote = |c: char| matches!(c, '"' | '/' | '\\' | '\'');
    let unquoted: String = sentence.chars().filter(|&c| !is_quote(c)).collect();
    let lowered = py_lower(py_strip(&unquoted));
    let mut utf8 = [0u8; 4];
    for c in lowered.chars().filter(|&c| !is_removed_punct(c)) {
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
}

/// Reusable buffers for [`clean_report_into`], one per thread.
#[derive(Default)]
pub struct Scratch {
    substituted: Vec<u8>,
    cleaned: Vec<u8>,
}

/// Cleans one report exactly like the reference code for `dataset`, into `scratch`;
/// returns the cleaned text and whether it is ASCII.
pub fn clean_report_into<'s>(
    text: &str,
    dataset: Dataset,
    scratch: &'s mut Scratch,
) -> (&'s str, bool) {
    let Scratch {
        substituted,
        cleaned: out,
    } = scratch;
    substitute(text, dataset, substituted);
    out.clear();
    out.reserve(substituted.len() + 4);
    let ascii = text.is_ascii();
    if ascii {
        // Lower-casing ASCII moves no `". "`, so the sentence stage lowers instead.
        let report = trim_py_space_bytes(substituted);
        for_each_sentence(report, out, ascii_sentence_stage);
    } else {
        let report =
            std::str::from_utf8(substituted).expect("ASCII substitutions keep UTF-8 valid");
        let report = py_lower(py_strip(report));
        for_each_sentence(report.as_bytes(), out, |sentence, out| {
            // Cut at ASCII bytes, so still whole characters.
            sentence_stage(
                std::str::from_utf8(sentence).expect("whole characters"),
                out,
            )
        });
    }
    out.extend_from_slice(b" .");
    let cleaned = std::str::from_utf8(out).expect("only whole characters are copied");
    (cleaned, ascii)
}

/// Runs `stage` on each sentence of `report` (split at `". "`, like `str.split`),
/// writing `" . "` between their outputs.
fn for_each_sentence(report: &[u8], out: &mut Vec<u8>, stage: impl Fn(&[u8], &mut Vec<u8>)) {
    let mut rest = report;
    while let Some(at) = find_sentence_end(rest) {
        stage(&rest[..at], out);
        out.extend_from_slice(b" . ");
        rest = &rest[at + 2..];
    }
    stage(rest, out);
}

/// Python's `str.strip()` on ASCII bytes.
fn trim_py_space_bytes(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| !is_py_space_byte(b));
    let Some(start) = start else {
        return &[];
    };
    let end = bytes
        .iter()
        .rposition(|&b| !is_py_space_byte(b))
        .unwrap_or(start);
    &bytes[start..=end]
}

/// Offset of the first `". "` in `bytes`.
fn find_sentence_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(dot) = memchr::memchr(b'.', &bytes[from..]) {
        let at = from + dot;
        if bytes.get(at + 1) == Some(&b' ') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Cleans one report exactly like the reference code for `dataset`.
pub fn clean_report(text: &str, dataset: Dataset) -> String {
    let mut scratch = Scratch::default();
    clean_report_into(text, dataset, &mut scratch).0.to_owned()
}

/// `str.split()` of ASCII text: runs of ASCII whitespace separate tokens.
pub fn ascii_split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    debug_assert!(s.is_ascii());
    let bytes = s.as_bytes();
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < bytes.len() && is_py_space_byte(bytes[pos]) {
            pos += 1;
        }
        if pos == bytes.len() {
            return None;
        }
        let start = pos;
        while pos < bytes.len() && !is_py_space_byte(bytes[pos]) {
            pos += 1;
        }
        Some(&s[start..pos])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mimic(s: &str) -> String {
        clean_report(s, Dataset::MimicCxr)
    }

    fn iu(s: &str) -> String {
        clean_report(s, Dataset::IuXray)
    }

    #[test]
    fn control_characters_survive() {
        assert_eq!(iu("a\0b\x7f"), "a\0b\x7f .");
    }

    #[test]
    fn plain_report() {
        assert_eq!(
            mimic("The lungs are clear. No effusion."),
            "the lungs are clear . no effusion ."
        );
    }

    #[test]
    fn quirk_colon_to_bracket_range_removes_comparison_signs_and_at() {
        assert_eq!(mimic("a<b=c>d@e?f;g:h[i]j"), "abcdefghij .");
        // '-' is not in the class: the range swallowed it.
        assert_eq!(mimic("well-defined"), "well-defined .");
    }

    #[test]
    fn quirk_empty_sentences_are_kept() {
        assert_eq!(mimic(". . ."), " .  .  .");
        assert_eq!(mimic(""), " .");
        assert_eq!(iu("!!!"), " .");
    }

    #[test]
    fn quirk_one_dot_space_deleted_anywhere() {
        assert_eq!(mimic("see 11. nodes"), "see 1nodes .");
        assert_eq!(mimic("1. clear. 2. normal"), "clear . normal .");
    }

    #[test]
    fn numbered_list_with_space_marker() {
        assert_eq!(iu("clear 3. normal"), "clear . normal .");
    }

    #[test]
    fn mimic_collapses_underscores_newlines_and_spaces() {
        assert_eq!(mimic("___ noted\nhere"), " noted here .");
        assert_eq!(iu("a\nb"), "a\nb .");
    }

    /// The reference's substitutions spelled out as `str::replace` passes.
    fn substitute_naive(text: &str, dataset: Dataset) -> String {
        let runs: &[Rule] = match dataset {
            Dataset::IuXray => &[("..", ".", 3)],
            Dataset::MimicCxr => &[
                ("\n", " ", 1),
                ("__", "_", 7),
                ("  ", " ", 6),
                ("..", ".", 8),
            ],
        };
        let mut text = text.to_owned();
        for &(from, to, passes) in runs.iter().chain(LIST_RULES) {
            for _ in 0..passes {
                text = text.replace(from, to);
            }
        }
        text
    }

    #[test]
    fn one_sweep_substitution_equals_repeated_replace() {
        let alphabet = [
            " ", "\n", "_", ".", "1", "2", "5", "a", "é", "  ", "___", "....",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut buf = Vec::new();
        for _ in 0..20_000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for k in 0..(state % 40) {
                let pick = (state >> (k % 48)) as usize + k as usize * 7;
                text.push_str(alphabet[pick % alphabet.len()]);
            }
            for dataset in [Dataset::IuXray, Dataset::MimicCxr] {
                substitute(&text, dataset, &mut buf);
                assert_eq!(
                    std::str::from_utf8(&buf).unwrap(),
                    substitute_naive(&text, dataset),
                    "{text:?}"
                );
            }
        }
        let long_runs = format!("x{}y{}z", "_".repeat(300), ".".repeat(1000));
        substitute(&long_runs, Dataset::MimicCxr, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf).unwrap(),
            substitute_naive(&long_runs, Dataset::MimicCxr)
        );
    }

    #[test]
    fn iu_keeps_double_spaces_mimic_collapses_them() {
        assert_eq!(iu("a  b"), "a  b .");
        assert_eq!(mimic("a  b"), "a b .");
    }

    #[test]
    fn python_whitespace_includes_information_separators() {
        assert!(is_py_space('\u{1c}'));
        assert!(!'\u{1c}'.is_whitespace());
        assert_eq!(py_strip("\u{1f} x \u{1c}"), "x");
        assert_eq!(
            py_split_whitespace("a\u{1d}b").collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn lowercase_follows_python_full_mapping_and_final_sigma() {
        assert_eq!(py_lower("İ"), "i\u{307}");
        assert_eq!(py_lower("ΑΣ"), "ας");
        assert_eq!(py_lower("ΑΣΑ"), "ασα");
        assert_eq!(py_lower("Α'Σ'"), "α'ς'");
    }

    /// A "Python" with older tables than Rust's, told through its probe output: U+0295
    /// `ʕ` was a lowercase letter (Unicode 14) and U+A7CB was unassigned.
    fn older_python() -> PyCase {
        let chars = ['a', 'A', 'Ο', 'ʕ', '\u{a7cb}', 'Σ', '\'', ' '];
        let python = case_probe(&chars)
            .to_lowercase()
            .replace("ʕσ\n", "ʕς\n")
            .replace("aʕσ\n", "aʕς\n")
            // Rust lowers U+A7CB to U+0264, a cased letter; this Python keeps it.
            .replace("\u{264}ς\n", "\u{a7cb}σ\n");
        let mut table = PyCase::default();
        table.add_probe(&chars, &python).unwrap();
        table
    }

    #[test]
    fn python_table_from_probe() {
        let table = older_python();
        assert_eq!(table.remapped().collect::<Vec<_>>(), ['\u{a7cb}']);
        assert_eq!(&*table.mapping[&'\u{a7cb}'], "\u{a7cb}");
        for (c, role) in [
            ('A', SigmaRole::Cased),
            ('Σ', SigmaRole::Cased),
            ('ʕ', SigmaRole::Cased),
            ('\'', SigmaRole::Ignorable),
            ('\u{a7cb}', SigmaRole::Other),
            (' ', SigmaRole::Other),
        ] {
            assert_eq!(table.role(c), role, "{c:?}");
        }
        let mut table = PyCase::default();
        assert!(table.add_probe(&['a', 'b'], "aσ\naaσ\n").is_err());
        assert!(table.add_probe(&['a'], "aσ\nabσ\n").is_err());
    }

    #[test]
    fn final_sigma_uses_the_python_roles() {
        let table = older_python();
        // ʕ is cased to this Python: the sigma before it is not final.
        assert_eq!(table.lower("ΟΣʕ"), "οσʕ");
        assert_eq!(table.lower("ʕΣ"), "ʕς");
        assert_eq!(table.lower("ʕ'Σ'"), "ʕ'ς'");
        // U+A7CB is unknown to it: kept, and no letter for the sigma rule.
        assert_eq!(table.lower("ΟΣ\u{a7cb}"), "ος\u{a7cb}");
        assert_eq!(table.lower("\u{a7cb}Σ"), "\u{a7cb}σ");
        assert_eq!(table.lower("ΟΣ ΣΣ"), "ος σς");
    }

    #[test]
    fn whitespace_check_names_the_odd_character() {
        let all: String = ('\0'..='\u{3000}').collect();
        let pieces: Vec<String> = py_split_whitespace(&all).map(str::to_owned).collect();
        assert!(check_py_space(&all, &pieces).is_ok());
        let fewer: Vec<String> = all
            .split(char::is_whitespace)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        let err = check_py_space(&all, &fewer).unwrap_err();
        assert!(err.to_string().contains("U+001C"), "{err}");
    }

    #[test]
    fn dataset_names() {
        assert_eq!(Dataset::parse("iu_xray").unwrap(), Dataset::IuXray);
        assert_eq!(Dataset::parse("mimic_cxr").unwrap().name(), "mimic_cxr");
        assert!(Dataset::parse("chexpert").is_err());
    }
}
