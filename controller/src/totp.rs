//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA-1, 30-second steps,
//! 6 digits — the parameters every authenticator app assumes when the otpauth URI says
//! nothing else. Pure: the caller passes the time, and the store settles replay (a code's
//! step is accepted once, see `Store::accept_totp_step`).

use ring::hmac;

/// Seconds per time step.
pub const STEP_SECONDS: i64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Steps either side of now that are accepted, for clock drift and typing time (RFC 6238
/// §5.2 recommends at most one).
pub const SKEW_STEPS: i64 = 1;
/// Secret length in bytes: 160 bits, the HMAC-SHA-1 block-size recommendation of RFC 4226.
pub const SECRET_BYTES: usize = 20;

/// A fresh random secret, base32 (no padding), as authenticator apps take it.
pub fn new_secret() -> String {
    let mut b = [0u8; SECRET_BYTES];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    data_encoding::BASE32_NOPAD.encode(&b)
}

/// Decodes a base32 secret (case and padding forgiven); `None` when it is not base32.
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let cleaned: String = secret
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    data_encoding::BASE32_NOPAD
        .decode(cleaned.as_bytes())
        .ok()
        .filter(|k| !k.is_empty())
}

/// The HOTP value of `key` at counter `step` with `digits` digits (RFC 4226 §5.3).
pub fn hotp(key: &[u8], step: u64, digits: u32) -> u32 {
    let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let tag = hmac::sign(&k, &step.to_be_bytes());
    let mac = tag.as_ref();
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let bin = (u32::from(mac[offset]) & 0x7f) << 24
        | u32::from(mac[offset + 1]) << 16
        | u32::from(mac[offset + 2]) << 8
        | u32::from(mac[offset + 3]);
    bin % 10u32.pow(digits)
}

/// The time step of Unix second `unix_s`.
pub fn step_of(unix_s: i64) -> i64 {
    unix_s.div_euclid(STEP_SECONDS)
}

/// The 6-digit code of `key` at Unix second `unix_s`, zero-padded (for tests and tooling).
pub fn code_at(key: &[u8], unix_s: i64) -> String {
    let step = u64::try_from(step_of(unix_s)).unwrap_or(0);
    format!(
        "{:0width$}",
        hotp(key, step, DIGITS),
        width = DIGITS as usize
    )
}

/// Which step within ±[`SKEW_STEPS`] of `unix_s` the `code` belongs to, if any. Compared in
/// constant time per candidate; anything but exactly six ASCII digits never matches.
pub fn matching_step(key: &[u8], code: &str, unix_s: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_s);
    let mut found = None;
    for step in now - SKEW_STEPS..=now + SKEW_STEPS {
        let Ok(s) = u64::try_from(step) else { continue };
        let want = format!("{:0width$}", hotp(key, s, DIGITS), width = DIGITS as usize);
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            want.as_bytes(),
            code.as_bytes(),
        )) {
            found = Some(step);
        }
    }
    found
}

/// The `otpauth://` URI an authenticator app scans (Key Uri Format): issuer and account in
/// the label and parameters, SHA1/6/30 written out so no app guesses.
pub fn otpauth_uri(issuer: &str, account: &str, secret_b32: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={secret_b32}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        enc(issuer),
        enc(account),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1 rows: the ASCII seed "12345678901234567890", 8 digits.
    #[test]
    fn rfc6238_sha1_test_vectors() {
        let key = b"12345678901234567890";
        for (t, want) in [
            (59_i64, 94_287_082_u32),
            (1_111_111_109, 7_081_804),
            (1_111_111_111, 14_050_471),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
            (20_000_000_000, 65_353_130),
        ] {
            let step = u64::try_from(step_of(t)).expect("positive");
            assert_eq!(hotp(key, step, 8), want, "T = {t}");
            // The 6-digit code is the low six digits of the same truncation.
            assert_eq!(code_at(key, t), format!("{:06}", want % 1_000_000));
        }
    }

    /// RFC 4226 Appendix D: HOTP values for counters 0..9.
    #[test]
    fn rfc4226_hotp_vectors() {
        let key = b"12345678901234567890";
        let want = [
            755_224, 287_082, 359_152, 969_429, 338_314, 254_676, 287_922, 162_583, 399_871,
            520_489,
        ];
        for (c, w) in want.iter().enumerate() {
            assert_eq!(hotp(key, c as u64, 6), *w, "counter {c}");
        }
    }

    #[test]
    fn accepts_one_step_of_skew_and_nothing_else() {
        let key = decode_secret(&new_secret()).expect("secret decodes");
        let t = 1_700_000_015;
        let now = code_at(&key, t);
        assert_eq!(matching_step(&key, &now, t), Some(step_of(t)));
        assert_eq!(
            matching_step(&key, &code_at(&key, t - 30), t),
            Some(step_of(t) - 1)
        );
        assert_eq!(
            matching_step(&key, &code_at(&key, t + 30), t),
            Some(step_of(t) + 1)
        );
        assert_eq!(matching_step(&key, &code_at(&key, t - 90), t), None);
        assert_eq!(matching_step(&key, "12345", t), None);
        assert_eq!(matching_step(&key, "12345a", t), None);
    }

    #[test]
    fn secrets_and_uri() {
        let s = new_secret();
        assert_eq!(decode_secret(&s).map(|k| k.len()), Some(SECRET_BYTES));
        assert_eq!(decode_secret(&s.to_lowercase()), decode_secret(&s));
        assert!(decode_secret("not base32!").is_none());
        let uri = otpauth_uri("St. Example", "amara", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            uri,
            "otpauth://totp/St.%20Example:amara?secret=JBSWY3DPEHPK3PXP&issuer=St.%20Example&algorithm=SHA1&digits=6&period=30"
        );
    }
}
