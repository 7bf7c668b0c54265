//! Property tests of the parsers that face input from others: the config
//! (whole files, durations, sizes, binds), notify datagrams and control
//! requests. Bounded: 256 cases each (seconds in all); set PROPTEST_CASES
//! for a longer run.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use drover::config::{Address, Dur, Layer, Size};
use drover::control::Command;
use drover::notify::{self, Message};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        // Failures are reported, not written to the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that looks like a config: keys, values and TOML punctuation mixed.
fn config_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("workers".to_string()),
        Just("graceful_timeout".to_string()),
        Just("max_memory".to_string()),
        Just("stop_signal".to_string()),
        Just("command".to_string()),
        Just("[env]".to_string()),
        Just(" = ".to_string()),
        Just("\n".to_string()),
        Just("\"".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(",".to_string()),
        "[0-9]{1,25}",
        "[a-zA-Z_ .=#'\\\\-]{0,12}",
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    /// Any text: parsed or refused with a place inside the text, never a panic.
    #[test]
    fn any_config_text_is_parsed_or_refused_at_a_place_in_it(text in config_like()) {
        if let Err(e) = Layer::parse("c.toml", &text) {
            let e = e.to_string();
            let rest = e.strip_prefix("c.toml:").unwrap_or_else(|| panic!("{e}"));
            let mut it = rest.splitn(3, ':');
            let line: usize = it.next().unwrap().parse().unwrap_or_else(|_| panic!("{e}"));
            let column: usize = it.next().unwrap().parse().unwrap_or_else(|_| panic!("{e}"));
            prop_assert!(line >= 1 && line <= text.split('\n').count(), "{e}");
            prop_assert!(column >= 1, "{e}");
        }
    }

    #[test]
    fn durations_in_every_unit_parse_to_their_value(n in 0u64..1_000_000, unit in 0usize..6) {
        let (suffix, scale) = [("ns", 1u64), ("us", 1_000), ("ms", 1_000_000),
            ("s", 1_000_000_000), ("min", 60_000_000_000), ("h", 3_600_000_000_000)][unit];
        let text = format!("{n}{suffix}");
        let expected = Duration::from_nanos(n.saturating_mul(scale));
        match Dur::from_str(&text) {
            Ok(d) => prop_assert_eq!(d.0, expected),
            Err(e) => prop_assert!(
                expected > Duration::from_secs(366 * 24 * 3600) && e.contains("too long"),
                "{text}: {e}"
            ),
        }
    }

    #[test]
    fn any_duration_text_is_parsed_or_refused_with_what_is_expected(s in "\\PC{0,20}") {
        if let Err(e) = Dur::from_str(&s) {
            prop_assert!(e.contains("expected a duration like") || e.contains("too long"), "{e}");
        }
    }

    #[test]
    fn sizes_in_every_unit_parse_to_their_value(n in 1u64..1_000_000_000, unit in 0usize..8) {
        let (suffix, factor) = [("", 1u64), ("B", 1), ("KB", 1000), ("KiB", 1 << 10),
            ("MB", 1_000_000), ("MiB", 1 << 20), ("GB", 1_000_000_000), ("GiB", 1 << 30)][unit];
        prop_assert_eq!(Size::from_str(&format!("{n}{suffix}")), Ok(Size(n * factor)));
    }

    #[test]
    fn any_size_text_is_parsed_or_refused_with_what_is_expected(s in "\\PC{0,24}") {
        if let Err(e) = Size::from_str(&s) {
            prop_assert!(e.contains("expected a number with an optional unit"), "{e}");
        }
    }

    #[test]
    fn tcp_binds_parse_to_their_address(ip in any::<u32>(), v6 in any::<u128>(), port in any::<u16>()) {
        let a = SocketAddr::from((Ipv4Addr::from(ip), port));
        prop_assert_eq!(Address::from_str(&a.to_string()), Ok(Address::Tcp(a)));
        let a = SocketAddr::from((Ipv6Addr::from(v6), port));
        prop_assert_eq!(Address::from_str(&a.to_string()), Ok(Address::Tcp(a)));
    }

    #[test]
    fn unix_and_fd_binds_parse_to_their_address(path in "/[a-z0-9/._-]{1,40}", fd in 0i32..100_000) {
        prop_assert_eq!(
            Address::from_str(&format!("unix:{path}")),
            Ok(Address::Unix(path.into()))
        );
        let parsed = Address::from_str(&format!("fd://{fd}"));
        if fd >= 3 {
            prop_assert_eq!(parsed, Ok(Address::Fd(fd)));
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    /// No lookup is made for these: no `host:port` form.
    #[test]
    fn any_bind_text_without_a_port_is_refused(s in "[^:]{0,30}") {
        prop_assert!(Address::from_str(&s).is_err() || s.starts_with("unix"));
    }

    #[test]
    fn any_datagram_parses_to_loggable_messages(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        for m in notify::parse(&bytes) {
            if let Message::Status(text) | Message::Other(text) = m {
                prop_assert!(text.len() <= notify::MAX_STATUS + 64, "{} bytes", text.len());
                prop_assert!(!text.chars().any(char::is_control), "{text:?}");
            }
        }
    }

    /// A READY=1 is found wherever it sits among other lines.
    #[test]
    fn ready_is_found_among_any_other_lines(
        before in proptest::collection::vec("[A-Z_]{1,10}=[ -~]{0,100}", 0..10),
        after in proptest::collection::vec("[A-Z_]{1,10}=[ -~]{0,100}", 0..10),
    ) {
        let lines: Vec<String> = before.iter().cloned()
            .chain(std::iter::once("READY=1".to_string()))
            .chain(after.iter().cloned())
            .collect();
        let messages = notify::parse(lines.join("\n").as_bytes());
        prop_assert_eq!(messages.len(), lines.len());
        prop_assert_eq!(&messages[before.len()], &Message::Ready);
    }

    #[test]
    fn any_control_request_is_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Command::parse(&bytes);
    }

    #[test]
    fn every_command_round_trips_and_refuses_any_other_field(
        which in 0usize..7,
        workers in any::<u32>(),
        quick in any::<bool>(),
        extra in "[a-z_]{1,12}",
    ) {
        let command = match which {
            0 => Command::Status,
            1 => Command::Reload,
            2 => Command::Upgrade,
            3 => Command::Ready,
            4 => Command::Events,
            5 => Command::Scale { workers },
            _ => Command::Stop { quick },
        };
        let line = serde_json::to_vec(&command).unwrap();
        prop_assert_eq!(Command::parse(&line), Ok(command.clone()));
        let mut object: serde_json::Value = serde_json::from_slice(&line).unwrap();
        if object.get(&extra).is_none() {
            object[&extra] = serde_json::Value::Bool(true);
            let e = Command::parse(&serde_json::to_vec(&object).unwrap()).unwrap_err();
            prop_assert!(e.contains(&format!("unknown field `{extra}`")), "{e}");
        }
    }
}
