//! Native core of cmn: report cleaning ([`clean`]), vocabulary and
//! tokenization ([`vocab`]), beam-search bookkeeping ([`beam`]) and the fused CPU
//! memory query ([`memory_query`]) are pure Rust; this file only converts types for
//! Python (module `cmn._native`), releases the GIL around batch work and maps errors
//! to exceptions.
pub mod beam;
pub mod clean;
pub mod error;
pub mod memory_query;
pub mod vocab;

use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use rayon::prelude::*;

use crate::beam::{BeamConfig, BeamSearch as CoreBeamSearch, MAX_LEN, MAX_ROWS};
use crate::clean::Dataset;
use crate::error::out_of_range;
use crate::vocab::{Vocab, MAX_SEQ_LEN};

create_exception!(
    _native,
    TextInputError,
    PyValueError,
    "Input the text core cannot use (bad argument, undecodable report, malformed tokenizer.json)."
);

fn to_py(err: error::Error) -> PyErr {
    TextInputError::new_err(err.to_string())
}

fn dataset(name: &str) -> PyResult<Dataset> {
    Dataset::parse(name).map_err(to_py)
}

/// An int argument, kept whole: a value beyond int64 is an out-of-range error naming
/// the argument, not pyo3's anonymous OverflowError. A non-int is pyo3's TypeError,
/// which names the argument.
struct Int(Result<i64, String>);

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i64>() {
            Ok(value) => Ok(Int(Ok(value))),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                Ok(Int(Err(obj.str()?.to_string())))
            }
            Err(e) => Err(e),
        }
    }
}

impl Int {
    /// The value if it lies in `lo..=hi`, else a ValueError naming `name` and the range
    /// (a bad argument, not bad data: `cmn.text` passes it on as it is).
    fn within(self, name: &str, lo: i64, hi: i64) -> PyResult<i64> {
        let error = match self.0 {
            Ok(value) if (lo..=hi).contains(&value) => return Ok(value),
            Ok(value) => out_of_range(name, lo, hi, value),
            Err(text) => out_of_range(name, lo, hi, text),
        };
        Err(PyValueError::new_err(error.to_string()))
    }

    /// [`Int::within`] for counts.
    fn count(self, name: &str, lo: usize, hi: usize) -> PyResult<usize> {
        let value = self.within(name, lo as i64, hi.min(i64::MAX as usize) as i64)?;
        Ok(value as usize)
    }
}

/// A 2-D array of `T` (`what`: its dtype's name), or a TypeError saying what came instead.
fn array2<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    what: &str,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    if let Ok(array) = obj.cast::<PyArray2<T>>() {
        return array
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")));
    }
    let got = match obj.cast::<PyUntypedArray>() {
        Ok(array) => format!("a {}-D {} array", array.ndim(), array.dtype().str()?),
        Err(_) => obj.get_type().name()?.to_string(),
    };
    Err(PyTypeError::new_err(format!(
        "{name} must be a 2-D {what} array, got {got}"
    )))
}

/// Installs the running Python's lowercasing table (see [`clean::PyCase`]) before the
/// first cleaning of text that is not ASCII (ASCII never needs it; deriving it takes
/// a fraction of a second, once per process); checks Python's whitespace against the
/// cleaner's on the way.
fn ensure_py_case(py: Python<'_>, texts: &[&str]) -> PyResult<()> {
    if clean::py_case_installed() || texts.iter().all(|t| t.is_ascii()) {
        return Ok(());
    }
    let unsupported = |e: PyErr| {
        PyRuntimeError::new_err(format!(
            "cmn's text core cannot follow this Python's Unicode tables: {e}"
        ))
    };
    let chars: Vec<char> = clean::case_probe_chars().collect();
    let mut table = clean::PyCase::default();
    // A slice at a time: the whole probe would hold about 100 MB at once.
    for slice in chars.chunks(1 << 15) {
        let probe = clean::case_probe(slice);
        let lowered: String = PyString::new(py, &probe).call_method0("lower")?.extract()?;
        table
            .add_probe(slice, &lowered)
            .map_err(|e| unsupported(to_py(e)))?;
    }
    let all: String = chars.iter().collect();
    let pieces: Vec<String> = PyString::new(py, &all).call_method0("split")?.extract()?;
    clean::check_py_space(&all, &pieces).map_err(|e| unsupported(to_py(e)))?;
    clean::install_py_case(table);
    Ok(())
}

/// A report as Rust text: `str` (no lone surrogates) or UTF-8 `bytes`;
/// `index` names the report in error messages of batch calls.
fn report_text(obj: &Bound<'_, PyAny>, index: Option<usize>) -> PyResult<String> {
    let what = || match index {
        Some(i) => format!("report {i}"),
        None => "report".to_owned(),
    };
    if let Ok(s) = obj.cast::<PyString>() {
        return match s.extract::<String>() {
            Ok(text) => Ok(text),
            Err(_) => {
                let bad = s
                    .to_string_lossy()
                    .chars()
                    .position(|c| c == char::REPLACEMENT_CHARACTER)
                    .unwrap_or(0);
                Err(TextInputError::new_err(format!(
                    "{} is not valid Unicode: it contains a lone surrogate (near character {bad}); \
                     decode the source with errors=\"replace\" or fix the file",
                    what()
                )))
            }
        };
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return String::from_utf8(b.as_bytes().to_vec()).map_err(|e| {
            TextInputError::new_err(format!(
                "{} is not valid UTF-8: invalid byte at offset {}",
                what(),
                e.utf8_error().valid_up_to()
            ))
        });
    }
    Err(TextInputError::new_err(format!(
        "{} must be str or bytes, not {}",
        what(),
        obj.get_type().name()?
    )))
}

extern "C" {
    // In the stable ABI only from 3.10, but exported by every CPython 3 (pyo3 hides
    // it under abi3-py39). Returns the str's own cached UTF-8, or NULL with an
    // exception set (lone surrogates).
    fn PyUnicode_AsUTF8AndSize(
        unicode: *mut pyo3::ffi::PyObject,
        size: *mut pyo3::ffi::Py_ssize_t,
    ) -> *const std::os::raw::c_char;
}

/// The UTF-8 of a `str` or `bytes` report without copying it; `None` where
/// [`report_text`] must build the error.
fn borrowed_text<'a>(obj: &'a Bound<'_, PyAny>) -> Option<&'a str> {
    if let Ok(s) = obj.cast::<PyString>() {
        let mut len: pyo3::ffi::Py_ssize_t = 0;
        // SAFETY: `s` is a live str; the buffer returned belongs to it and is never
        // changed or freed before the object, which `obj` keeps alive for 'a.
        let data = unsafe { PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut len) };
        if data.is_null() {
            drop(PyErr::take(obj.py()));
            return None;
        }
        // SAFETY: CPython guarantees `len` valid UTF-8 bytes at `data`.
        return Some(unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(
                data.cast::<u8>(),
                len as usize,
            ))
        });
    }
    let b = obj.cast::<PyBytes>().ok()?;
    std::str::from_utf8(b.as_bytes()).ok()
}

/// The reports of a batch call, kept alive so their text can be read without the GIL.
/// `name` is the argument, for the error when one report is passed instead of many.
fn report_items<'py>(objs: &Bound<'py, PyAny>, name: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if objs.is_instance_of::<PyString>()
        || objs.is_instance_of::<PyBytes>()
        || objs.is_instance_of::<PyByteArray>()
    {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a list of reports, not a single {}: wrap it in a list",
            objs.get_type().name()?
        )));
    }
    objs.try_iter()?.collect()
}

fn report_texts<'a>(items: &'a [Bound<'_, PyAny>]) -> PyResult<Vec<&'a str>> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match borrowed_text(item) {
            Some(text) => Ok(text),
            None => Err(report_text(item, Some(i))
                .err()
                .unwrap_or_else(|| TextInputError::new_err(format!("report {i} is unreadable")))),
        })
        .collect()
}

/// Cleans one report (`str`, or UTF-8 `bytes`) with the rules of `dataset`.
#[pyfunction]
fn clean_report(py: Python<'_>, text: &Bound<'_, PyAny>, dataset: &str) -> PyResult<String> {
    let ds = self::dataset(dataset)?;
    let text = report_text(text, None)?;
    ensure_py_case(py, &[&text])?;
    Ok(clean::clean_report(&text, ds))
}

/// Cleans many reports in parallel, without the GIL.
#[pyfunction]
fn clean_reports(py: Python<'_>, texts: &Bound<'_, PyAny>, dataset: &str) -> PyResult<Vec<String>> {
    let ds = self::dataset(dataset)?;
    let items = report_items(texts, "texts")?;
    let texts = report_texts(&items)?;
    ensure_py_case(py, &texts)?;
    Ok(py.detach(|| {
        texts
            .par_iter()
            .with_min_len(256)
            .map_init(clean::Scratch::default, |scratch, t| {
                clean::clean_report_into(t, ds, scratch).0.to_owned()
            })
            .collect()
    }))
}

/// Python's `str.lower()` as the cleaner applies it (exposed for tests).
#[pyfunction]
fn _py_lower(py: Python<'_>, text: &str) -> PyResult<String> {
    ensure_py_case(py, &[text])?;
    Ok(clean::py_lower(text))
}

/// Word-level tokenizer with the reference's ids; id 0 is BOS, EOS and padding.
#[pyclass(frozen, module = "cmn._native")]
struct Tokenizer {
    vocab: Vocab,
}

#[pymethods]
impl Tokenizer {
    /// Builds the vocabulary from raw training reports (cleaned here).
    /// A `threshold` beyond int64 means the same as the nearest int64: no count reaches
    /// it, or every count does.
    #[staticmethod]
    fn build(
        py: Python<'_>,
        reports: &Bound<'_, PyAny>,
        threshold: Int,
        dataset: &str,
    ) -> PyResult<Self> {
        let threshold = match threshold.0 {
            Ok(value) => value,
            Err(text) if text.starts_with('-') => i64::MIN,
            Err(_) => i64::MAX,
        };
        let ds = self::dataset(dataset)?;
        let items = report_items(reports, "reports")?;
        let texts = report_texts(&items)?;
        ensure_py_case(py, &texts)?;
        let vocab = py.detach(|| Vocab::build_raw(&texts, threshold, ds));
        Ok(Tokenizer { vocab })
    }

    /// Reads a `tokenizer.json` string; `dataset` supplies or overrides the cleaning rule.
    #[staticmethod]
    #[pyo3(signature = (text, dataset=None))]
    fn from_str(text: &Bound<'_, PyString>, dataset: Option<&str>) -> PyResult<Self> {
        let ds = dataset.map(self::dataset).transpose()?;
        let text = text.to_cow().map_err(|_| {
            TextInputError::new_err("not valid Unicode: the text holds a lone surrogate")
        })?;
        Ok(Tokenizer {
            vocab: Vocab::from_json(&text, ds).map_err(to_py)?,
        })
    }

    /// The `tokenizer.json` document.
    fn to_str(&self) -> String {
        self.vocab.to_json()
    }

    #[getter]
    fn dataset(&self) -> &'static str {
        self.vocab.dataset().name()
    }

    #[getter]
    fn unk_id(&self) -> i64 {
        self.vocab.unk_id()
    }

    fn __len__(&self) -> usize {
        self.vocab.len()
    }

    /// `None` for a token not in the vocabulary, also one that is not valid Unicode.
    fn token_to_id(&self, token: &Bound<'_, PyString>) -> Option<i64> {
        self.vocab.token_to_id(&token.to_cow().ok()?)
    }

    /// `None` for any int that is not an id, however large.
    fn id_to_token(&self, id: Int) -> Option<&str> {
        self.vocab.id_to_token(id.0.ok()?)
    }

    /// Cleans and encodes one report: `[0] + ids + [0]`, not truncated.
    fn encode(&self, report: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
        let text = report_text(report, None)?;
        ensure_py_case(report.py(), &[&text])?;
        Ok(self
            .vocab
            .encode_cleaned(&clean::clean_report(&text, self.vocab.dataset())))
    }

    /// Cleans and encodes reports into an int64 array `(n, max_len)`: each sequence
    /// cut to `max_len` (at most [`MAX_SEQ_LEN`]), then padded with 0.
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        reports: &Bound<'py, PyAny>,
        max_len: Int,
    ) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let max_len = max_len.count("max_len", 0, MAX_SEQ_LEN)?;
        let items = report_items(reports, "reports")?;
        let texts = report_texts(&items)?;
        ensure_py_case(py, &texts)?;
        let vocab = &self.vocab;
        // numpy's allocator asks for huge pages, which makes the first touch of a
        // large result much cheaper than a plain zeroed Vec; numpy.zeros reports a
        // failed allocation as an exception, where PyArray2::zeros would panic.
        let array = py
            .import("numpy")?
            .call_method1("zeros", ((texts.len(), max_len), "int64"))
            .map_err(|e| {
                TextInputError::new_err(format!(
                    "cannot allocate the ({}, max_len={max_len}) int64 result: {e}",
                    texts.len()
                ))
            })?
            .cast_into::<PyArray2<i64>>()?;
        {
            let mut view = array.readwrite();
            let flat = view.as_slice_mut().expect("a new array is contiguous");
            if max_len > 0 {
                py.detach(|| {
                    flat.par_chunks_mut(max_len)
                        .zip(texts.par_iter())
                        .with_min_len(256)
                        .for_each_init(clean::Scratch::default, |scratch, (row, text)| {
                            vocab.encode_raw_into_zeroed(text, scratch, row)
                        })
                });
            }
        }
        Ok(array)
    }

    /// Tokens joined by spaces; a leading 0 (BOS) is skipped and the next 0 ends the text.
    /// Ids after that 0 are not looked at, also ones beyond int64.
    fn decode(&self, ids: Vec<Int>) -> PyResult<String> {
        let mut read = Vec::with_capacity(ids.len());
        for (i, id) in ids.into_iter().enumerate() {
            match id.0 {
                Ok(id) => {
                    read.push(id);
                    if id == 0 && i > 0 {
                        break;
                    }
                }
                Err(text) => {
                    return Err(TextInputError::new_err(format!(
                        "token id {text} is outside the vocabulary (0..{})",
                        self.vocab.len()
                    )))
                }
            }
        }
        self.vocab.decode(&read).map_err(to_py)
    }

    /// [`Tokenizer::decode`] for each row of an int64 array `(n, L)`.
    fn decode_batch(&self, ids: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let ids = array2::<i64>(ids, "ids", "int64")?;
        let ids = ids.as_array();
        ids.rows()
            .into_iter()
            .map(|row| match row.as_slice() {
                Some(slice) => self.vocab.decode(slice),
                None => self.vocab.decode(&row.to_vec()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py)
    }
}

/// Beam-search bookkeeping driven once per step by `cmn.decode.beam_search`
/// (see the protocol in `cmn.text.BeamSearch`).
#[pyclass(module = "cmn._native")]
struct BeamSearch {
    core: CoreBeamSearch,
}

/// Per item, `(tokens, score)` of the best ended hypotheses.
type NBest = Vec<Vec<(Vec<i64>, f64)>>;

type StepArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
);

#[pymethods]
impl BeamSearch {
    /// Sizes are checked before anything is allocated: `batch_size * beam_size` at most
    /// [`MAX_ROWS`], the rest within int64.
    #[new]
    #[pyo3(signature = (batch_size, beam_size, max_len, *, eos_id=Int(Ok(0)), length_penalty=0.0, no_repeat_ngram_size=Int(Ok(0)), n_best=Int(Ok(1))))]
    fn new(
        batch_size: Int,
        beam_size: Int,
        max_len: Int,
        eos_id: Int,
        length_penalty: f64,
        no_repeat_ngram_size: Int,
        n_best: Int,
    ) -> PyResult<Self> {
        let cfg = BeamConfig {
            batch_size: batch_size.count("batch_size", 1, MAX_ROWS)?,
            beam_size: beam_size.count("beam_size", 1, MAX_ROWS)?,
            max_len: max_len.count("max_len", 1, MAX_LEN)?,
            eos_id: eos_id.within("eos_id", 0, i64::MAX)?,
            length_penalty,
            no_repeat_ngram_size: no_repeat_ngram_size.count("no_repeat_ngram_size", 0, MAX_LEN)?,
            n_best: n_best.count("n_best", 1, MAX_ROWS)?,
        };
        Ok(BeamSearch {
            core: CoreBeamSearch::new(cfg).map_err(to_py)?,
        })
    }

    #[getter]
    fn done(&self) -> bool {
        self.core.is_done()
    }

    #[getter]
    fn num_rows(&self) -> usize {
        self.core.num_rows()
    }

    fn cum_scores<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.core.cum_scores().into_pyarray(py)
    }

    fn banned<'py>(
        &self,
        py: Python<'py>,
    ) -> (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>) {
        let (rows, tokens) = self.core.banned();
        (rows.into_pyarray(py), tokens.into_pyarray(py))
    }

    fn step<'py>(
        &mut self,
        py: Python<'py>,
        scores: &Bound<'py, PyAny>,
        indices: &Bound<'py, PyAny>,
        vocab_size: Int,
    ) -> PyResult<StepArrays<'py>> {
        let vocab_size = vocab_size.count("vocab_size", 1, i64::MAX as usize)?;
        let scores = array2::<f32>(scores, "scores", "float32")?;
        let indices = array2::<i64>(indices, "indices", "int64")?;
        let (scores, indices) = (scores.as_array(), indices.as_array());
        if indices.dim() != scores.dim() {
            return Err(TextInputError::new_err(format!(
                "scores {:?} and indices {:?} must have the same shape",
                scores.dim(),
                indices.dim()
            )));
        }
        let k = scores.dim().1;
        let scores = scores.iter().copied().collect::<Vec<f32>>();
        let indices = indices.iter().copied().collect::<Vec<i64>>();
        let out = self
            .core
            .step(&scores, &indices, k, vocab_size)
            .map_err(to_py)?;
        Ok((
            out.tokens.into_pyarray(py),
            out.reorder.into_pyarray(py),
            out.cum_scores.into_pyarray(py),
        ))
    }

    fn finalize(&self) -> PyResult<NBest> {
        let result = self.core.finalize().map_err(to_py)?;
        Ok(result
            .into_iter()
            .map(|item| item.into_iter().map(|h| (h.tokens, h.score)).collect())
            .collect())
    }
}

/// An array argument of the memory query, checked for rank and element type.
fn mq_array<'a, 'py, T: numpy::Element>(
    name: &str,
    array: &'a Bound<'py, PyAny>,
) -> PyResult<&'a Bound<'py, PyArray3<T>>> {
    array.cast::<PyArray3<T>>().map_err(|_| {
        PyValueError::new_err(format!(
            "memory query: {name} must be a 3-d {} array",
            std::any::type_name::<T>()
        ))
    })
}

/// An input array of the memory query, borrowed for reading.
fn mq_in<'py, T: numpy::Element>(
    name: &str,
    array: &Bound<'py, PyAny>,
) -> PyResult<numpy::PyReadonlyArray3<'py, T>> {
    Ok(mq_array::<T>(name, array)?.try_readonly()?)
}

/// An output array of the memory query, borrowed for writing in place.
fn mq_out<'py, T: numpy::Element>(
    name: &str,
    array: &Bound<'py, PyAny>,
) -> PyResult<numpy::PyReadwriteArray3<'py, T>> {
    Ok(mq_array::<T>(name, array)?.try_readwrite()?)
}

fn mq_slice<'a, T: numpy::Element>(
    name: &str,
    array: &'a numpy::PyReadonlyArray3<'_, T>,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("memory query: {name} must be C-contiguous")))
}

fn mq_slice_mut<'a, T: numpy::Element>(
    name: &str,
    array: &'a mut numpy::PyReadwriteArray3<'_, T>,
) -> PyResult<&'a mut [T]> {
    array
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("memory query: {name} must be C-contiguous")))
}

fn mq_error(err: error::Error) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Memory query sizes from q (G, R, d), k (G, N, d) and a (G, R, K) array.
fn mq_dims(q: &[usize], k: &[usize], sel: &[usize]) -> memory_query::Dims {
    memory_query::Dims {
        groups: q[0],
        rows: q[1],
        slots: k[1],
        dim: q[2],
        topk: sel[2],
    }
}

/// Runs `$body` with `$t` = the float type of `$probe` (float64, else float32: a wrong
/// type then fails the first conversion with a message naming the array).
macro_rules! with_float_type {
    ($probe:expr, $t:ident, $body:block) => {
        if $probe.cast::<PyArray3<f64>>().is_ok() {
            type $t = f64;
            $body
        } else {
            type $t = f32;
            $body
        }
    };
}

/// Fused CPU memory query, forward (see `cmn.ops._cpu`): fills `out` (G, R, d), `idx`
/// (G, R, K) int64 and `probs` (G, R, K) from `q` (G, R, d), `k`, `v` (G, N, d) and the
/// optional dropout multipliers `mask` (G, R, K); float32 or float64, C-contiguous. Runs
/// on `threads` threads without the GIL.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, out, idx, probs, threads))]
#[allow(clippy::too_many_arguments)]
fn memory_query_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    idx: &Bound<'_, PyAny>,
    probs: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(q, T, {
        let (q, k, v) = (
            mq_in::<T>("q", q)?,
            mq_in::<T>("k", k)?,
            mq_in::<T>("v", v)?,
        );
        let mask = mask.map(|m| mq_in::<T>("mask", m)).transpose()?;
        let (mut out, mut idx, mut probs) = (
            mq_out::<T>("out", out)?,
            mq_out::<i64>("idx", idx)?,
            mq_out::<T>("probs", probs)?,
        );
        let dims = mq_dims(q.shape(), k.shape(), idx.shape());
        let (q, k, v) = (mq_slice("q", &q)?, mq_slice("k", &k)?, mq_slice("v", &v)?);
        let mask = mask.as_ref().map(|m| mq_slice("mask", m)).transpose()?;
        let (out, idx, probs) = (
            mq_slice_mut("out", &mut out)?,
            mq_slice_mut("idx", &mut idx)?,
            mq_slice_mut("probs", &mut probs)?,
        );
        let input = memory_query::Inputs {
            dims,
            q,
            k,
            v,
            mask,
        };
        let output = memory_query::Selected { out, idx, probs };
        let isa = memory_query::Isa::detect();
        py.detach(|| {
            memory_query::with_threads(threads, || memory_query::forward(input, output, isa))
                .and_then(|r| r)
        })
        .map_err(mq_error)
    })
}

/// Fused CPU memory query, backward: overwrites `dq` (G, R, d), `dk`, `dv` (G, N, d)
/// from the forward's inputs, its saved `idx` and `probs`, the output gradient `d_out`
/// (G, R, d) and the optional gradient `d_weights` (G, R, K) of the returned weights.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, idx, probs, d_out, d_weights, dq, dk, dv, threads))]
#[allow(clippy::too_many_arguments)]
fn memory_query_backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    idx: &Bound<'_, PyAny>,
    probs: &Bound<'_, PyAny>,
    d_out: &Bound<'_, PyAny>,
    d_weights: Option<&Bound<'_, PyAny>>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(q, T, {
        let (q, k, v) = (
            mq_in::<T>("q", q)?,
            mq_in::<T>("k", k)?,
            mq_in::<T>("v", v)?,
        );
        let mask = mask.map(|m| mq_in::<T>("mask", m)).transpose()?;
        let (idx, probs) = (mq_in::<i64>("idx", idx)?, mq_in::<T>("probs", probs)?);
        let d_out = mq_in::<T>("d_out", d_out)?;
        let d_weights = d_weights.map(|m| mq_in::<T>("d_weights", m)).transpose()?;
        let (mut dq, mut dk, mut dv) = (
            mq_out::<T>("dq", dq)?,
            mq_out::<T>("dk", dk)?,
            mq_out::<T>("dv", dv)?,
        );
        let dims = mq_dims(q.shape(), k.shape(), idx.shape());
        let (q, k, v) = (mq_slice("q", &q)?, mq_slice("k", &k)?, mq_slice("v", &v)?);
        let mask = mask.as_ref().map(|m| mq_slice("mask", m)).transpose()?;
        let (idx, probs) = (mq_slice("idx", &idx)?, mq_slice("probs", &probs)?);
        let d_out = mq_slice("d_out", &d_out)?;
        let d_weights = d_weights
            .as_ref()
            .map(|m| mq_slice("d_weights", m))
            .transpose()?;
        let grads = memory_query::Grads {
            dq: mq_slice_mut("dq", &mut dq)?,
            dk: mq_slice_mut("dk", &mut dk)?,
            dv: mq_slice_mut("dv", &mut dv)?,
        };
        let input = memory_query::Inputs {
            dims,
            q,
            k,
            v,
            mask,
        };
        let isa = memory_query::Isa::detect();
        py.detach(|| {
            memory_query::with_threads(threads, || {
                memory_query::backward(input, idx, probs, d_out, d_weights, grads, isa)
            })
            .and_then(|r| r)
        })
        .map_err(mq_error)
    })
}

#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(clean_report, m)?)?;
    m.add_function(wrap_pyfunction!(clean_reports, m)?)?;
    m.add_function(wrap_pyfunction!(_py_lower, m)?)?;
    m.add_function(wrap_pyfunction!(memory_query_forward, m)?)?;
    m.add_function(wrap_pyfunction!(memory_query_backward, m)?)?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<BeamSearch>()?;
    m.add("TextInputError", m.py().get_type::<TextInputError>())?;
    Ok(())
}
