//! Rewrites of the query AST that turn the streaming parts of the language into plain SQL
//! that DataFusion plans once:
//!
//! - window table functions in `FROM` — `TUMBLE(stream, event_time, size)`,
//!   `HOP(stream, event_time, slide, size)`, `SESSION(stream, event_time, gap [, key...])` —
//!   become per-query tables that the engine fills with one closed window's rows at a time;
//! - aggregates with a bounded frame, `avg(x) OVER (PARTITION BY k ORDER BY t RANGE
//!   BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW)`, become calls of an engine
//!   function that keeps the frame's state across windows and micro-batches (see
//!   [`crate::functions::rolling`]), so "the last hour" is not re-read every window.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    ObjectName, OrderByExpr, Query, TableAlias, TableFactor, UnaryOperator, Value, VisitMut,
    VisitorMut, WindowFrameBound, WindowFrameUnits, WindowType,
};
use datafusion::sql::sqlparser::tokenizer::Span;

use super::diag::{Diagnostic, Loc, SourceFile};
use super::parse::{DEVICE_ID, EVENT_TIME, WINDOW_END};
use crate::functions::detect::models::{self as detectors, Kind as DetectorKind, Param};
use crate::time::parse_duration;

/// How a query's rows are grouped in event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows `[k * size, (k + 1) * size)`.
    Tumble { size: Duration },
    /// Windows of `size` starting every `slide`; a row is in `size / slide` of them.
    Hop { size: Duration, slide: Duration },
    /// Per key: rows closer than `gap` to each other form one window, which ends `gap`
    /// after its last row.
    Session { gap: Duration, keys: Vec<String> },
}

impl WindowKind {
    pub fn describe(&self) -> String {
        match self {
            WindowKind::Tumble { size } => format!("TUMBLE {}", humantime::format_duration(*size)),
            WindowKind::Hop { size, slide } => format!(
                "HOP {} every {}",
                humantime::format_duration(*size),
                humantime::format_duration(*slide)
            ),
            WindowKind::Session { gap, keys } => format!(
                "SESSION gap {} by {}",
                humantime::format_duration(*gap),
                keys.join(", ")
            ),
        }
    }
}

/// A query's window: its kind and the streams it reads through it (two for a window join).
#[derive(Debug, Clone)]
pub struct WindowSpec {
    pub kind: WindowKind,
    pub inputs: Vec<WindowInput>,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct WindowInput {
    /// The source or view windowed.
    pub stream: String,
    /// The table the engine registers for this input's closed windows.
    pub table: String,
    pub loc: Loc,
}

/// The most windows a row may belong to in a HOP (size / slide); more would copy memory
/// for little use, and a sliding aggregate over a long span is better written as an
/// `OVER (... RANGE ... PRECEDING)` frame.
pub const MAX_HOP_OVERLAP: u128 = 1000;

fn window_fn(name: &ObjectName) -> Option<&'static str> {
    match name.to_string().to_ascii_lowercase().as_str() {
        "tumble" => Some("TUMBLE"),
        "hop" => Some("HOP"),
        "session" => Some("SESSION"),
        _ => None,
    }
}

fn name_span(n: &ObjectName) -> Span {
    n.0.first()
        .and_then(|p| p.as_ident())
        .map(|i| i.span)
        .unwrap_or(Span::empty())
}

/// True when the query holds a window function anywhere in its FROM clauses.
pub fn has_window(q: &Query) -> bool {
    let mut q = q.clone();
    struct Finder(bool);
    impl VisitorMut for Finder {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                args: Some(_),
                ..
            } = t
            {
                self.0 |= window_fn(name).is_some();
            }
            ControlFlow::Continue(())
        }
    }
    let mut f = Finder(false);
    let _ = q.visit(&mut f);
    f.0
}

/// Replaces every window function in the query's FROM clauses with a window table, aliased
/// as the stream so `telemetry.light` keeps working. Several window functions in one query
/// (a window join) must be the same window.
pub fn rewrite_windows(
    file: &Arc<SourceFile>,
    query: &mut Query,
    tag: &str,
) -> Result<Option<WindowSpec>, Diagnostic> {
    struct Rewriter<'a> {
        file: &'a Arc<SourceFile>,
        tag: &'a str,
        found: Option<WindowSpec>,
        error: Option<Diagnostic>,
    }
    impl VisitorMut for Rewriter<'_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            let TableFactor::Table {
                name,
                args: Some(args),
                alias,
                ..
            } = t
            else {
                return ControlFlow::Continue(());
            };
            let Some(func) = window_fn(name) else {
                return ControlFlow::Continue(());
            };
            let loc = Loc::at(self.file, name_span(name));
            let (stream, kind) = match window_args(func, &args.args, &loc) {
                Ok(v) => v,
                Err(e) => {
                    self.error = Some(e);
                    return ControlFlow::Break(());
                }
            };
            let k = self.found.as_ref().map_or(0, |w| w.inputs.len());
            let table = format!("__window_{}_{k}", self.tag);
            match &mut self.found {
                None => {
                    self.found = Some(WindowSpec {
                        kind: kind.clone(),
                        inputs: vec![],
                        loc: loc.clone(),
                    })
                }
                Some(w) => {
                    if w.kind != kind {
                        self.error = Some(loc.error(format!(
                            "a window join needs the same window on both sides: this is {}, the first is {}",
                            kind.describe(),
                            w.kind.describe()
                        )));
                        return ControlFlow::Break(());
                    }
                    if matches!(kind, WindowKind::Session { .. }) {
                        self.error = Some(loc.error(
                            "one SESSION window per query: session windows of two streams do not line up",
                        ));
                        return ControlFlow::Break(());
                    }
                }
            }
            if alias.is_none() {
                *alias = Some(TableAlias {
                    explicit: true,
                    name: Ident::new(&stream),
                    columns: vec![],
                    at: None,
                });
            }
            *name = ObjectName::from(vec![Ident::new(&table)]);
            if let Some(w) = &mut self.found {
                w.inputs.push(WindowInput { stream, table, loc });
            }
            // The rewritten factor is a plain table: no arguments.
            if let TableFactor::Table { args, .. } = t {
                *args = None;
            }
            ControlFlow::Continue(())
        }
    }
    let mut r = Rewriter {
        file,
        tag,
        found: None,
        error: None,
    };
    let _ = query.visit(&mut r);
    match r.error {
        Some(e) => Err(e),
        None => Ok(r.found),
    }
}

fn window_args(
    func: &str,
    args: &[FunctionArg],
    loc: &Loc,
) -> Result<(String, WindowKind), Diagnostic> {
    let usage = match func {
        "TUMBLE" => "write TUMBLE(stream, event_time, INTERVAL '10 seconds')",
        "HOP" => {
            "write HOP(stream, event_time, INTERVAL '10 seconds' /* slide */, INTERVAL '1 minute' /* size */)"
        }
        _ => {
            "write SESSION(stream, event_time, INTERVAL '30 seconds' /* gap */ [, key_column ...])"
        }
    };
    let mut exprs: Vec<&Expr> = args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            _ => Err(loc
                .error(format!("{func} takes plain arguments"))
                .with_help(usage)),
        })
        .collect::<Result<_, _>>()?;
    if exprs.is_empty() {
        return Err(loc.error(format!("{func} needs a stream")).with_help(usage));
    }
    let stream = match exprs.remove(0) {
        Expr::Identifier(i) => i.value.clone(),
        other => {
            return Err(loc
                .error(format!(
                    "{func}'s first argument must name a source or view, not `{other}`"
                ))
                .with_help(usage));
        }
    };
    // The time column is optional: windows always run on the stream's event time.
    if let Some(first) = exprs.first()
        && !matches!(first, Expr::Interval(_) | Expr::Value(_))
    {
        let ok = matches!(first, Expr::Identifier(i) if i.value == EVENT_TIME);
        if !ok {
            return Err(loc
                    .error(format!("windows run on the stream's `{EVENT_TIME}` column, not `{first}`"))
                    .with_help("declare which payload field is the event time with the source option event_time = '<field>'"));
        }
        exprs.remove(0);
    }
    let duration = |e: &Expr, what: &str| -> Result<Duration, Diagnostic> {
        let text = interval_text(e).ok_or_else(|| {
            loc.error(format!("{what} must be an INTERVAL, not `{e}`"))
                .with_help(usage)
        })?;
        let d = parse_duration(&text).map_err(|e| loc.error(e))?;
        if d < Duration::from_millis(10) {
            return Err(loc.error(format!("{what} must be at least 10 milliseconds")));
        }
        Ok(d)
    };
    let kind = match (func, exprs.as_slice()) {
        ("TUMBLE", [size]) => WindowKind::Tumble {
            size: duration(size, "the window size")?,
        },
        ("HOP", [slide, size]) => {
            let slide = duration(slide, "the slide")?;
            let size = duration(size, "the window size")?;
            if size.as_millis() % slide.as_millis() != 0 || size < slide {
                return Err(loc
                    .error(format!(
                        "a HOP window's size ({}) must be a whole multiple of its slide ({})",
                        humantime::format_duration(size),
                        humantime::format_duration(slide)
                    ))
                    .with_help(usage));
            }
            if size.as_millis() / slide.as_millis() > MAX_HOP_OVERLAP {
                return Err(loc
                    .error(format!(
                        "a HOP window may overlap at most {MAX_HOP_OVERLAP} others (size / slide)"
                    ))
                    .with_help("for an aggregate over a long span, use avg(x) OVER (PARTITION BY ... RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW)"));
            }
            WindowKind::Hop { size, slide }
        }
        ("SESSION", [gap, keys @ ..]) => {
            let gap = duration(gap, "the session gap")?;
            let keys = keys
                .iter()
                .map(|k| match k {
                    Expr::Identifier(i) => Ok(i.value.clone()),
                    other => Err(loc
                        .error(format!(
                            "a session key must be a column name, not `{other}`"
                        ))
                        .with_help(usage)),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let keys = if keys.is_empty() {
                vec![DEVICE_ID.to_string()]
            } else {
                keys
            };
            WindowKind::Session { gap, keys }
        }
        _ => {
            return Err(loc
                .error(format!("wrong arguments for {func}"))
                .with_help(usage));
        }
    };
    Ok((stream, kind))
}

/// The text of `INTERVAL '10 seconds'`, `INTERVAL '10' SECOND` or `'10 seconds'`.
pub fn interval_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Interval(iv) => {
            let v = match iv.value.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            Some(match &iv.leading_field {
                Some(f) => format!("{v} {f}"),
                None => v,
            })
        }
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The aggregates whose bounded frames span windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RollingFn {
    Avg,
    Sum,
    Min,
    Max,
    Count,
    Stddev,
}

impl RollingFn {
    fn from_name(n: &str) -> Option<RollingFn> {
        Some(match n {
            "avg" | "mean" => RollingFn::Avg,
            "sum" => RollingFn::Sum,
            "min" => RollingFn::Min,
            "max" => RollingFn::Max,
            "count" => RollingFn::Count,
            "stddev" | "stddev_samp" => RollingFn::Stddev,
            _ => return None,
        })
    }
}

/// A frame that reaches back across windows: the last `Range` of event time, or the last
/// `Rows` rows (both including the current row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frame {
    Range(Duration),
    Rows(u64),
}

/// One `agg(x) OVER (...)` or detector that the engine keeps across windows; its function
/// is registered under `udf` when the query is planned.
#[derive(Debug, Clone)]
pub struct RollingSpec {
    pub udf: String,
    pub state: StateSpec,
    pub loc: Loc,
}

/// What a function with state across windows computes.
#[derive(Debug, Clone)]
pub enum StateSpec {
    /// An aggregate over a frame.
    Frame { func: RollingFn, frame: Frame },
    /// An anomaly detector over `dims` value columns ([`crate::functions::detect`]).
    Detector { kind: DetectorKind, dims: usize },
}

impl std::fmt::Display for StateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateSpec::Frame { func, frame } => write!(f, "{func:?} {frame:?}"),
            StateSpec::Detector { kind, dims } => write!(f, "{kind:?} over {dims} value(s)"),
        }
    }
}

/// Most rows a ROWS frame may keep per key.
pub const MAX_FRAME_ROWS: u64 = 100_000;

/// Rewrites `agg(x) OVER (PARTITION BY k... [ORDER BY t] {RANGE|ROWS} BETWEEN n PRECEDING
/// AND CURRENT ROW)` into `__rolling_<owner>_<i>(x, t, k...)`. Without ORDER BY, `t` is
/// `window_end` in a windowed query and `event_time` elsewhere. Other OVER clauses are left
/// to DataFusion and see only the current window's rows.
pub fn rewrite_rolling(
    file: &Arc<SourceFile>,
    query: &mut Query,
    owner: &str,
    windowed: bool,
) -> Result<Vec<RollingSpec>, Diagnostic> {
    struct Rewriter<'a> {
        file: &'a Arc<SourceFile>,
        owner: &'a str,
        windowed: bool,
        found: Vec<RollingSpec>,
        /// (what the frame computes, its function's name), to share identical frames.
        seen: Vec<(String, String)>,
        error: Option<Diagnostic>,
    }
    impl VisitorMut for Rewriter<'_> {
        type Break = ();
        fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            let Expr::Function(f) = e else {
                return ControlFlow::Continue(());
            };
            let lower = f.name.to_string().to_ascii_lowercase();
            if detectors::is_detector(&lower) {
                return match self.detector(f, &lower) {
                    Ok(call) => {
                        *e = call;
                        ControlFlow::Continue(())
                    }
                    Err(d) => {
                        self.error = Some(d);
                        ControlFlow::Break(())
                    }
                };
            }
            let Some(WindowType::WindowSpec(spec)) = &f.over else {
                return ControlFlow::Continue(());
            };
            let Some(frame) = &spec.window_frame else {
                return ControlFlow::Continue(());
            };
            let Some(func) = RollingFn::from_name(&f.name.to_string().to_ascii_lowercase()) else {
                return ControlFlow::Continue(());
            };
            let WindowFrameBound::Preceding(Some(back)) = &frame.start_bound else {
                return ControlFlow::Continue(());
            };
            let loc = Loc::at(self.file, name_span(&f.name));
            if !matches!(frame.end_bound, None | Some(WindowFrameBound::CurrentRow)) {
                self.error = Some(loc.error(
                    "a frame over past windows ends at CURRENT ROW: the future has not arrived yet",
                ));
                return ControlFlow::Break(());
            }
            let frame = match frame.units {
                WindowFrameUnits::Range => {
                    match interval_text(back).map(|t| parse_duration(&t)) {
                        Some(Ok(d)) if d.as_millis() > 0 => Frame::Range(d),
                        Some(Err(msg)) => {
                            self.error = Some(loc.error(msg));
                            return ControlFlow::Break(());
                        }
                        _ => {
                            self.error = Some(loc
                            .error(format!("RANGE ... PRECEDING takes an INTERVAL here, not `{back}`"))
                            .with_help("write RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW"));
                            return ControlFlow::Break(());
                        }
                    }
                }
                WindowFrameUnits::Rows => match back.to_string().parse::<u64>() {
                    Ok(n) if n <= MAX_FRAME_ROWS => Frame::Rows(n),
                    _ => {
                        self.error = Some(loc.error(format!(
                            "ROWS ... PRECEDING takes a whole number up to {MAX_FRAME_ROWS}, not `{back}`"
                        )));
                        return ControlFlow::Break(());
                    }
                },
                WindowFrameUnits::Groups => return ControlFlow::Continue(()),
            };
            let value = match &f.args {
                FunctionArguments::List(list) if list.args.len() == 1 => match &list.args[0] {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => x.clone(),
                    FunctionArg::Unnamed(FunctionArgExpr::Wildcard) if func == RollingFn::Count => {
                        Expr::value(Value::Number("1".into(), false))
                    }
                    _ => {
                        self.error = Some(loc.error(format!("`{}` takes one value here", f.name)));
                        return ControlFlow::Break(());
                    }
                },
                _ => {
                    self.error = Some(loc.error(format!("`{}` takes one value here", f.name)));
                    return ControlFlow::Break(());
                }
            };
            let time = match self.time(&spec.order_by, &loc) {
                Ok(t) => t,
                Err(d) => {
                    self.error = Some(d);
                    return ControlFlow::Break(());
                }
            };
            let mut args = vec![value, time];
            args.extend(spec.partition_by.iter().cloned());
            *e = self.call(StateSpec::Frame { func, frame }, args, loc);
            ControlFlow::Continue(())
        }
    }
    impl Rewriter<'_> {
        /// The time a function with state is ordered by: its ORDER BY, else `window_end` in
        /// a windowed query and `event_time` elsewhere.
        fn time(&self, order_by: &[OrderByExpr], loc: &Loc) -> Result<Expr, Diagnostic> {
            match order_by {
                [] => Ok(Expr::Identifier(Ident::new(if self.windowed {
                    WINDOW_END
                } else {
                    EVENT_TIME
                }))),
                [o] if o.options.asc != Some(false) => Ok(o.expr.clone()),
                _ => Err(loc.error(
                    "a function with state across windows is ordered by one time column, ascending",
                )),
            }
        }

        /// The call of the engine function that keeps `state`, registered once per query for
        /// each distinct computation.
        fn call(&mut self, state: StateSpec, args: Vec<Expr>, loc: Loc) -> Expr {
            // The same frame or detector written twice in a query (in WHERE and in the
            // SELECT list) is one function with one state, so both places see the same
            // values.
            let signature = format!(
                "{state} {}",
                args.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let udf = match self.seen.iter().find(|(s, _)| *s == signature) {
                Some((_, name)) => name.clone(),
                None => {
                    let name = format!("__rolling_{}_{}", self.owner, self.seen.len());
                    self.seen.push((signature, name.clone()));
                    self.found.push(RollingSpec {
                        udf: name.clone(),
                        state,
                        loc,
                    });
                    name
                }
            };
            Expr::Function(Function {
                name: ObjectName::from(vec![Ident::new(&udf)]),
                uses_odbc_syntax: false,
                parameters: FunctionArguments::None,
                args: FunctionArguments::List(FunctionArgumentList {
                    duplicate_treatment: None,
                    args: args
                        .into_iter()
                        .map(|a| FunctionArg::Unnamed(FunctionArgExpr::Expr(a)))
                        .collect(),
                    clauses: vec![],
                }),
                filter: None,
                null_treatment: None,
                over: None,
                within_group: vec![],
            })
        }

        /// `detector(value [, param...] [, name => param...]) [OVER (PARTITION BY k... [ORDER
        /// BY t])]`, or with several values for a detector over several columns.
        fn detector(&mut self, f: &Function, name: &str) -> Result<Expr, Diagnostic> {
            let loc = Loc::at(self.file, name_span(&f.name));
            let (partition, order) = match &f.over {
                None => (vec![], vec![]),
                Some(WindowType::WindowSpec(spec)) => {
                    if spec.window_frame.is_some() {
                        return Err(loc
                            .error(format!("`{name}` keeps its own history; it takes no frame"))
                            .with_help("give the history as a parameter, e.g. history => 200"));
                    }
                    (spec.partition_by.clone(), spec.order_by.clone())
                }
                Some(WindowType::NamedWindow(_)) => return Err(loc.error(format!(
                    "write `{name}(...) OVER (PARTITION BY ...)` in place, not with a named window"
                ))),
            };
            let list = match &f.args {
                FunctionArguments::List(l) => l.args.as_slice(),
                _ => &[],
            };
            let multi = detectors::is_multi(name);
            let mut values = Vec::new();
            let mut positional = Vec::new();
            let mut named = Vec::new();
            for a in list {
                match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x))
                        if multi || values.is_empty() =>
                    {
                        values.push(x.clone())
                    }
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => {
                        positional.push(param(x).ok_or_else(|| {
                            loc.error(format!(
                                "`{name}`'s parameters ({}) are numbers or quoted text, not `{x}`",
                                detectors::param_names(name).join(", ")
                            ))
                        })?)
                    }
                    FunctionArg::Named {
                        name: n,
                        arg: FunctionArgExpr::Expr(x),
                        ..
                    } => named.push((
                        n.value.clone(),
                        param(x).ok_or_else(|| {
                            loc.error(format!("`{n}` is a number or quoted text, not `{x}`"))
                        })?,
                    )),
                    FunctionArg::ExprNamed {
                        name: Expr::Identifier(n),
                        arg: FunctionArgExpr::Expr(x),
                        ..
                    } => named.push((
                        n.value.clone(),
                        param(x).ok_or_else(|| {
                            loc.error(format!("`{n}` is a number or quoted text, not `{x}`"))
                        })?,
                    )),
                    other => {
                        return Err(loc.error(format!("`{name}` cannot take `{other}`")));
                    }
                }
            }
            if values.is_empty() {
                return Err(loc.error(format!("`{name}` needs a value to score")));
            }
            let kind =
                DetectorKind::from_call(name, positional, named).map_err(|m| loc.error(m))?;
            let dims = values.len();
            let mut args = values;
            args.push(self.time(&order, &loc)?);
            args.extend(partition);
            Ok(self.call(StateSpec::Detector { kind, dims }, args, loc))
        }
    }

    /// A detector's parameter: a number (maybe negative) or quoted text.
    fn param(x: &Expr) -> Option<Param> {
        match x {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n.parse().ok().map(Param::Number),
                Value::SingleQuotedString(s) => Some(Param::Text(s.clone())),
                _ => None,
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => match param(expr)? {
                Param::Number(n) => Some(Param::Number(-n)),
                Param::Text(_) => None,
            },
            Expr::Nested(x) => param(x),
            _ => None,
        }
    }
    let mut r = Rewriter {
        file,
        owner,
        windowed,
        found: vec![],
        seen: vec![],
        error: None,
    };
    let _ = query.visit(&mut r);
    match r.error {
        Some(e) => Err(e),
        None => Ok(r.found),
    }
}
