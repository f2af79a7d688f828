//! The asking shell's provider settings, sent with every `ask` so that what the user set in
//! this shell applies to this ask, whatever environment the daemon was started with.

use spark_proto::methods::ProviderSettings;

/// `SPARK_PROVIDER_URL`, `SPARK_MODEL` and `SPARK_API_KEY` (else `OPENAI_API_KEY`) as read
/// through `var`; empty values count as unset, as the daemon's own configuration treats them.
/// `None` when the shell sets none of them: the daemon's settings apply unchanged.
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Option<ProviderSettings> {
    let get = |name: &str| var(name).filter(|v| !v.is_empty());
    let settings = ProviderSettings {
        url: get("SPARK_PROVIDER_URL"),
        model: get("SPARK_MODEL"),
        api_key: get("SPARK_API_KEY").or_else(|| get("OPENAI_API_KEY")),
    };
    (!settings.is_empty()).then_some(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Option<ProviderSettings> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        from_env(|k| map.get(k).map(|v| (*v).to_owned()))
    }

    #[test]
    fn only_what_the_shell_sets_is_sent() {
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[("SPARK_MODEL", "")]), None, "empty is unset");
        let s = with(&[("SPARK_MODEL", "m")]).expect("model");
        assert_eq!(
            (s.url, s.model.as_deref(), s.api_key),
            (None, Some("m"), None)
        );
    }

    #[test]
    fn the_spark_key_wins_over_openai_s() {
        let s = with(&[("OPENAI_API_KEY", "a")]).expect("key");
        assert_eq!(s.api_key.as_deref(), Some("a"));
        let s = with(&[("OPENAI_API_KEY", "a"), ("SPARK_API_KEY", "b")]).expect("key");
        assert_eq!(s.api_key.as_deref(), Some("b"));
    }
}
