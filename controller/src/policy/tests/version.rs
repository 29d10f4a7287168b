//! Versions compare numerically and display as written.

use crate::policy::Version;

fn v(s: &str) -> Version {
    s.parse().expect("version")
}

#[test]
fn versions_compare_numerically_and_show_as_written() {
    assert_eq!(v("24.04"), v("24.4"));
    assert_eq!(v("24.04"), v("24.4.0"));
    assert!(v("24.04.1 LTS") > v("24.04"));
    assert!(v("10.0.22631.4169") > v("10.0.19045"));
    assert!(v("14.10") > v("14.9"));
    assert!(v("v1.2.0-beta") == v("1.2"));
    assert_eq!(v("24.04").to_string(), "24.04");
    assert_eq!(v(" 24.04.1 LTS ").to_string(), "24.04.1 LTS");
    for bad in ["", "abc", "1..2", "1.2.3.4.5", "24.", "1.2x", "99999999999"] {
        assert!(bad.parse::<Version>().is_err(), "{bad:?}");
    }
    let json = serde_json::to_string(&v("24.04")).expect("json");
    assert_eq!(json, "\"24.04\"");
    assert!(serde_json::from_str::<Version>("\"twenty\"").is_err());
}
