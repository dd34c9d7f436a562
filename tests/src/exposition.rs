//! A strict reader of the Prometheus text exposition format (0.0.4), for
//! checking what the admin APIs serve: the metrics are written by hand
//! (see `mqlb-metrics`), so a test must catch a family declared twice, a
//! sample without a `# TYPE`, a duplicate series, a histogram whose
//! buckets shrink, or a value that is not a number.

use std::collections::{HashMap, HashSet};

/// One family's declared type and its samples (`name{labels}` → value).
#[derive(Debug, Default)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    /// Each sample line, keyed by its name and labels as written.
    pub samples: Vec<(String, f64)>,
}

/// Parses `text`, returning every family by name or the first problem.
pub fn parse(text: &str) -> Result<HashMap<String, Family>, String> {
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut helped = HashSet::new();
    let mut series = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !helped.insert(name.to_string()) {
                return Err(at("HELP given twice"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(at("bad TYPE line"));
            };
            if !valid_name(name) {
                return Err(at("bad metric name"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at("unknown type"));
            }
            if families.contains_key(name) {
                return Err(at("TYPE given twice"));
            }
            families.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    samples: Vec::new(),
                },
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("value is not a number"))?,
        };
        let name = key.split('{').next().unwrap_or_default();
        if !valid_name(name) {
            return Err(at("bad metric name"));
        }
        if key.contains('{') && !key.ends_with('}') {
            return Err(at("unclosed labels"));
        }
        let family = [name, name.strip_suffix("_bucket").unwrap_or(name)]
            .into_iter()
            .chain(name.strip_suffix("_sum"))
            .chain(name.strip_suffix("_count"))
            .find(|f| families.contains_key(*f))
            .ok_or_else(|| at("sample before its TYPE"))?
            .to_string();
        if !series.insert(key.to_string()) {
            return Err(at("series given twice"));
        }
        if let Some(f) = families.get_mut(&family) {
            f.samples.push((key.to_string(), value));
        }
    }
    for (name, f) in &families {
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
    }
    Ok(families)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Buckets never shrink, end in `+Inf`, and `+Inf` equals `_count`, for
/// each label set.
fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let mut last: HashMap<String, f64> = HashMap::new();
    let mut inf: HashMap<String, f64> = HashMap::new();
    for (key, v) in &f.samples {
        let labels = key.split_once('{').map_or("", |(_, l)| l);
        if key.starts_with(&format!("{name}_bucket")) {
            let (rest, le) = labels
                .rsplit_once("le=\"")
                .ok_or_else(|| format!("{key}: a bucket without le"))?;
            let other = rest.trim_end_matches(',').to_string();
            if let Some(prev) = last.insert(other.clone(), *v) {
                if *v < prev {
                    return Err(format!("{key}: bucket smaller than the one before"));
                }
            }
            if le == "+Inf\"}" {
                inf.insert(other, *v);
            }
        } else if key.starts_with(&format!("{name}_count")) {
            let other = labels.trim_end_matches('}').to_string();
            if inf.get(&other) != Some(v) {
                return Err(format!("{key}: count is not the +Inf bucket"));
            }
        }
    }
    Ok(())
}

/// One sample's value, by its name and labels exactly as written.
pub fn sample(families: &HashMap<String, Family>, key: &str) -> Option<f64> {
    families
        .values()
        .flat_map(|f| &f.samples)
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_found() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
        assert_eq!(sample(&parse(good).unwrap(), "a_total{x=\"1\"}"), Some(3.0));
        for bad in [
            "a_total 1\n",
            "# TYPE a counter\n# TYPE a counter\n",
            "# TYPE a gauge\na 1\na 2\n",
            "# TYPE a gauge\na one\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
