//! MQTT topic patterns with named captures, e.g. `site/{site}/{device_id}/telemetry`.
//!
//! A source's pattern becomes an MQTT subscription filter (each `{name}` turns into `+`)
//! and, for each message, yields the captured parts as columns. A sink's pattern is a
//! template filled from each output row.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
    /// `+`: any one level, not captured.
    AnyLevel,
    /// `#`: the rest of the topic (last segment only), not captured.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    segments: Vec<Segment>,
}

impl TopicPattern {
    pub fn parse(text: &str) -> Result<TopicPattern, String> {
        if text.is_empty() {
            return Err("topic pattern is empty".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty()
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || name.starts_with(|c: char| c.is_ascii_digit())
                {
                    return Err(format!(
                        "`{{{name}}}` is not a valid capture: use a column name made of letters, digits and `_`"
                    ));
                }
                Segment::Capture(name.to_string())
            } else if *part == "+" {
                Segment::AnyLevel
            } else if *part == "#" {
                if i != parts.len() - 1 {
                    return Err("`#` may only be the last level of a topic pattern".into());
                }
                Segment::Rest
            } else if part.contains(['{', '}', '+', '#']) {
                return Err(format!(
                    "topic level `{part}` mixes text with a capture or wildcard: a level is either text, `{{name}}`, `+` or `#`"
                ));
            } else {
                Segment::Literal(part.to_string())
            };
            segments.push(seg);
        }
        let mut seen = std::collections::HashSet::new();
        for s in &segments {
            if let Segment::Capture(n) = s
                && !seen.insert(n.clone())
            {
                return Err(format!("`{{{n}}}` is captured twice"));
            }
        }
        Ok(TopicPattern {
            text: text.to_string(),
            segments,
        })
    }

    /// Names captured from the topic, in order.
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Capture(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The MQTT subscription filter: captures become `+`.
    pub fn filter(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Capture(_) | Segment::AnyLevel => "+",
                Segment::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Matches a concrete topic; on success pushes the captured values (in `captures()`
    /// order) onto `out` and returns true.
    pub fn match_into<'t>(&self, topic: &'t str, out: &mut Vec<&'t str>) -> bool {
        let start = out.len();
        let mut levels = topic.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                _ => {
                    let Some(level) = levels.next() else {
                        out.truncate(start);
                        return false;
                    };
                    match seg {
                        Segment::Literal(l) if l != level => {
                            out.truncate(start);
                            return false;
                        }
                        Segment::Capture(_) => out.push(level),
                        _ => {}
                    }
                }
            }
        }
        if levels.next().is_some() {
            out.truncate(start);
            return false;
        }
        true
    }

    /// Fills the template with values, looked up by capture name. Returns `None` when a
    /// value is missing or would change the topic's shape (contains `/`, `+`, `#`).
    pub fn render<'v>(&self, mut value: impl FnMut(&str) -> Option<&'v str>) -> Option<String> {
        let mut out = String::with_capacity(self.text.len() + 16);
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            match seg {
                Segment::Literal(l) => out.push_str(l),
                Segment::Capture(n) => {
                    let v = value(n)?;
                    if v.is_empty() || v.contains(['/', '+', '#']) {
                        return None;
                    }
                    out.push_str(v);
                }
                Segment::AnyLevel | Segment::Rest => return None,
            }
        }
        Some(out)
    }

    /// True when the pattern has wildcards that cannot be filled (allowed for sources only).
    pub fn has_wildcards(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::AnyLevel | Segment::Rest))
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
