//! ChunkedDecoder on any bytes: no panic; fed in two or three pieces it
//! decodes as fed whole (the same body, bytes used, end and error).
#![no_main]

use drover_h1::{ChunkedDecoder, Error, Limits};
use libfuzzer_sys::fuzz_target;

fn decode(input: &[u8], cuts: &[usize]) -> (Vec<u8>, usize, bool, Option<Error>) {
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    let mut used = 0;
    let mut at = 0;
    for &end in cuts.iter().chain([&input.len()]) {
        match d.decode(&input[at..end], &mut out) {
            Ok(n) => {
                used += n;
                if n < end - at {
                    assert!(d.is_done());
                    break;
                }
            }
            Err(e) => return (out, 0, false, Some(e)),
        }
        at = end;
    }
    (out, used, d.is_done(), None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let whole = decode(input, &[]);
    assert!(whole.1 <= input.len());
    let a = usize::from(pick) % (input.len() + 1);
    let b = a + (input.len() - a) / 2;
    assert_eq!(whole, decode(input, &[a, b]));
});
