//! parse_head on any bytes: no panic; a prefix gets None or the whole's
//! answer; an accepted head's parts lie in the buffer, within its length.
#![no_main]

use drover_h1::{parse_head, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, raw)) = data.split_first() else {
        return;
    };
    // Half the runs with small limits, which short inputs can reach.
    let limits = if pick & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            request_line: usize::from(pick >> 1 & 0x3f),
            fields: usize::from(pick >> 4),
            field_size: usize::from(pick >> 2),
        }
    };
    let whole = parse_head(raw, &limits);
    if let Ok(Some((head, n))) = &whole {
        assert!(*n <= raw.len() && raw[..*n].ends_with(b"\r\n\r\n"));
        for (name, value) in &head.headers {
            assert!(!name.is_empty() && value.len() < *n);
        }
    }
    if let Err(e) = &whole {
        assert!([400, 417, 431, 501, 505].contains(&e.status), "{e}");
    }
    // Prefixes at a few cut points.
    for k in [raw.len() / 2, raw.len() / 3, raw.len().saturating_sub(1)] {
        match (parse_head(&raw[..k], &limits), &whole) {
            (Ok(None), Ok(Some((_, n)))) => assert!(k < *n),
            (Ok(None), _) => {}
            (Ok(Some(p)), Ok(Some(w))) => assert_eq!(&p, w),
            (Err(p), Err(w)) => assert_eq!(&p, w),
            (p, w) => panic!("prefix of {k} bytes: {p:?}, whole: {w:?}"),
        }
    }
});
