//! Byte classes of RFC 9110/9112, as lookup tables.

/// A 256-entry table: `table!(|b| class of b)`.
macro_rules! table {
    (|$b:ident| $class:expr) => {{
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            t[i] = $class;
            i += 1;
        }
        t
    }};
}

/// tchar: what a method, a field name or a coding is made of.
pub(crate) static TOKEN: [bool; 256] = table!(|b| {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
});

/// What a field value may hold: HTAB, SP, VCHAR and obs-text (no CTL, no DEL).
pub(crate) static VALUE: [bool; 256] = table!(|b| b == b'\t' || (b >= b' ' && b != 0x7f));

/// What a request-target may hold: VCHAR and obs-text (no CTL, SP or DEL;
/// obs-text must then be UTF-8).
pub(crate) static TARGET: [bool; 256] = table!(|b| b > b' ' && b != 0x7f);

/// Whether `s` is a token (RFC 9110 5.6.2): a method, a field name.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| TOKEN[b as usize])
}

pub(crate) fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `s` without leading and trailing SP/HTAB.
pub(crate) fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}
