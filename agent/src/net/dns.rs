//! Finding a name's addresses, for model servers given by a DNS name whose
//! records are followed (`--model-server http://NAME:PORT,...,dns`: a
//! Kubernetes headless Service has one A/AAAA record per ready pod).
//!
//! Two resolvers: the system's (getaddrinfo, with the pod's search domains;
//! the default), or one nameserver asked directly (`--dns-server`), with a
//! small client of its own: an A and an AAAA query over UDP (EDNS0, 1232
//! bytes), over TCP when the answer is truncated. Either tells a definite
//! answer (the addresses, or that the name has none: scaled to zero) from
//! no answer (a timeout, a server failure), which keeps what was known.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whom names are asked of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Resolver {
    /// The system's resolver (getaddrinfo: /etc/hosts, resolv.conf and
    /// its search domains).
    #[default]
    System,
    /// This nameserver, directly (no search domains: give the full name).
    Server(SocketAddr),
}

/// A name's addresses, sorted and without repeats; empty when the name
/// definitely has none. An error is no answer: what was known stays.
pub type Lookup = Result<Vec<IpAddr>, String>;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const TYPE_CNAME: u16 = 5;
const RCODE_NXDOMAIN: u8 = 3;
/// How long one query waits for its answer, and how often it is sent.
const QUERY_TIMEOUT: Duration = Duration::from_millis(1500);
const TRIES: usize = 2;

impl Resolver {
    pub async fn lookup(&self, host: &str) -> Lookup {
        match self {
            Resolver::System => system(host).await,
            Resolver::Server(server) => {
                let (a, aaaa) = tokio::join!(
                    query(*server, host, TYPE_A),
                    query(*server, host, TYPE_AAAA)
                );
                // Both must answer: an IPv4-only Service answers AAAA with
                // no records, so a lost A query alone must not read as "no
                // addresses".
                let all: BTreeSet<IpAddr> = a?.into_iter().chain(aaaa?).collect();
                Ok(all.into_iter().collect())
            }
        }
    }
}

async fn system(host: &str) -> Lookup {
    match tokio::net::lookup_host((host, 0)).await {
        Ok(addrs) => {
            let all: BTreeSet<IpAddr> = addrs.map(|a| a.ip()).collect();
            Ok(all.into_iter().collect())
        }
        Err(e) => {
            // getaddrinfo's EAI_NONAME and EAI_NODATA are definite: the
            // name has no address now. The standard library passes on only
            // their text: glibc's ("Name or service not known", "No address
            // associated with hostname") and musl's ("Name does not
            // resolve"). Anything else (EAI_AGAIN, a failing server) is no
            // answer.
            let text = e.to_string();
            if text.contains("not known")
                || text.contains("No address associated")
                || text.contains("does not resolve")
            {
                Ok(Vec::new())
            } else {
                Err(text)
            }
        }
    }
}

/// One question to `server`: the addresses of `qtype` it answers.
async fn query(server: SocketAddr, host: &str, qtype: u16) -> Lookup {
    let id = fastrand::u16(..);
    let msg = encode_query(id, host, qtype)?;
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("a UDP socket: {e}"))?;
    socket
        .connect(server)
        .await
        .map_err(|e| format!("{server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..TRIES {
        socket
            .send(&msg)
            .await
            .map_err(|e| format!("{server}: {e}"))?;
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(format!("{server}: {e}")),
                Ok(Ok(n)) => match decode_answer(&buf[..n], id, qtype) {
                    // Someone else's answer (or a stray): wait on.
                    Err(Decoded::NotOurs) => continue,
                    Err(Decoded::Truncated) => return query_tcp(server, &msg, id, qtype).await,
                    Err(Decoded::Failed(e)) => return Err(format!("{server}: {e}")),
                    Ok(addrs) => return Ok(addrs),
                },
            }
        }
    }
    Err(format!("{server} did not answer"))
}

async fn query_tcp(server: SocketAddr, msg: &[u8], id: u16, qtype: u16) -> Lookup {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(server).await?;
        let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(msg);
        tcp.write_all(&framed).await?;
        let len = tcp.read_u16().await?;
        let mut answer = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(QUERY_TIMEOUT * 2, exchange)
        .await
        .map_err(|_| format!("{server} did not answer over TCP"))?
        .map_err(|e| format!("{server} over TCP: {e}"))?;
    match decode_answer(&answer, id, qtype) {
        Ok(addrs) => Ok(addrs),
        Err(Decoded::Failed(e)) => Err(format!("{server}: {e}")),
        Err(_) => Err(format!("{server} answered something else over TCP")),
    }
}

/// A recursive query for `name`'s records of `qtype`, with an EDNS0 OPT
/// record offering 1232-byte UDP answers.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]); // 1 question, 1 additional
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{name}` is not a DNS name"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a DNS name"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // IN
    // OPT: root name, type 41, class = UDP payload size, no flags.
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&1232u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    Ok(out)
}

/// Why an answer gave no addresses.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not the answer to our query (another id, or not an answer).
    NotOurs,
    /// Cut short over UDP: ask again over TCP.
    Truncated,
    /// The server failed, refused, or sent something unreadable.
    Failed(String),
}

/// The addresses of `qtype` in the answer to query `id`: empty for
/// NXDOMAIN or a NOERROR answer without such records (the name has none).
/// CNAME chains are followed by the server; their records are skipped.
pub fn decode_answer(msg: &[u8], id: u16, qtype: u16) -> Result<Vec<IpAddr>, Decoded> {
    let bad = |what: &str| Decoded::Failed(format!("a malformed answer ({what})"));
    if msg.len() < 12 {
        return Err(Decoded::NotOurs);
    }
    let u16_at =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?])) };
    if u16_at(0) != Some(id) || msg[2] & 0x80 == 0 {
        return Err(Decoded::NotOurs);
    }
    if msg[2] & 0x02 != 0 {
        return Err(Decoded::Truncated);
    }
    // Neither recursion available nor an authoritative answer: a referral
    // (a server that does not recurse), which says nothing of the name.
    if msg[3] & 0x80 == 0 && msg[2] & 0x04 == 0 {
        return Err(Decoded::Failed(
            "the server neither recurses nor answers for the name".into(),
        ));
    }
    match msg[3] & 0x0f {
        0 => {}
        RCODE_NXDOMAIN => return Ok(Vec::new()),
        2 => return Err(Decoded::Failed("the server failed (SERVFAIL)".into())),
        5 => return Err(Decoded::Failed("the server refused the query".into())),
        rcode => {
            return Err(Decoded::Failed(format!(
                "the server answered rcode {rcode}"
            )));
        }
    }
    let questions = u16_at(4).ok_or_else(|| bad("header"))?;
    let answers = u16_at(6).ok_or_else(|| bad("header"))?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at).ok_or_else(|| bad("question"))? + 4;
    }
    let mut out = BTreeSet::new();
    let mut aliases = 0;
    for _ in 0..answers {
        at = skip_name(msg, at).ok_or_else(|| bad("answer name"))?;
        let rtype = u16_at(at).ok_or_else(|| bad("answer"))?;
        let class = u16_at(at + 2).ok_or_else(|| bad("answer"))?;
        let len = usize::from(u16_at(at + 8).ok_or_else(|| bad("answer"))?);
        let data = msg
            .get(at + 10..at + 10 + len)
            .ok_or_else(|| bad("record data"))?;
        at += 10 + len;
        if class == 1 && rtype == TYPE_CNAME {
            aliases += 1;
        }
        if class != 1 || rtype != qtype {
            continue;
        }
        match (rtype, data.len()) {
            (TYPE_A, 4) => {
                out.insert(IpAddr::from(<[u8; 4]>::try_from(data).expect("4 bytes")));
            }
            (TYPE_AAAA, 16) => {
                out.insert(IpAddr::from(<[u8; 16]>::try_from(data).expect("16 bytes")));
            }
            _ => return Err(bad("address length")),
        }
    }
    // An alias whose target the server did not resolve is no answer.
    if out.is_empty() && aliases > 0 {
        return Err(Decoded::Failed(
            "the answer holds only an alias (CNAME), not its addresses".into(),
        ));
    }
    Ok(out.into_iter().collect())
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query` with these records (pointing at the question's
    /// name) and `rcode`.
    fn answer(query: &[u8], rcode: u8, records: &[(u16, &[u8])], truncated: bool) -> Vec<u8> {
        let question_end = skip_name(query, 12).unwrap() + 4;
        let mut out = query[..question_end].to_vec();
        out[2] = 0x81 | if truncated { 0x02 } else { 0 };
        out[3] = 0x80 | rcode; // recursion available
        out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        out[10..12].copy_from_slice(&[0, 0]);
        for (rtype, data) in records {
            out.extend_from_slice(&[0xc0, 12]);
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&[0, 1, 0, 0, 0, 5]);
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn a_query_is_encoded_with_its_labels_and_an_opt_record() {
        let q = encode_query(0x1234, "vllm.ns.svc.", TYPE_A).unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..25], b"\x04vllm\x02ns\x03svc\x00");
        assert_eq!(&q[25..29], &[0, 1, 0, 1]);
        assert_eq!(&q[29..], &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        assert!(encode_query(1, "a..b", TYPE_A).is_err());
        assert!(encode_query(1, &"x".repeat(64), TYPE_A).is_err());
        assert!(encode_query(1, "", TYPE_A).is_err());
    }

    #[test]
    fn answers_are_read_with_compressed_names_and_other_records_skipped() {
        let q = encode_query(7, "vllm.test", TYPE_A).unwrap();
        let cname: &[u8] = b"\x05other\x04test\x00";
        let msg = answer(
            &q,
            0,
            &[
                (5, cname),
                (TYPE_A, &[10, 0, 0, 2]),
                (TYPE_A, &[10, 0, 0, 1]),
                (TYPE_A, &[10, 0, 0, 2]),
            ],
            false,
        );
        assert_eq!(
            decode_answer(&msg, 7, TYPE_A).unwrap(),
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        let q6 = encode_query(8, "vllm.test", TYPE_AAAA).unwrap();
        let v6 = Ipv6Addr::LOCALHOST.octets();
        let msg = answer(&q6, 0, &[(TYPE_AAAA, &v6)], false);
        assert_eq!(
            decode_answer(&msg, 8, TYPE_AAAA).unwrap(),
            vec![IpAddr::from(v6)]
        );
    }

    #[test]
    fn nxdomain_is_no_address_and_failures_are_no_answer() {
        let q = encode_query(9, "gone.test", TYPE_A).unwrap();
        assert_eq!(
            decode_answer(&answer(&q, 3, &[], false), 9, TYPE_A),
            Ok(vec![])
        );
        assert_eq!(
            decode_answer(&answer(&q, 0, &[], false), 9, TYPE_A),
            Ok(vec![])
        );
        assert!(matches!(
            decode_answer(&answer(&q, 2, &[], false), 9, TYPE_A),
            Err(Decoded::Failed(e)) if e.contains("SERVFAIL")
        ));
        assert_eq!(
            decode_answer(&answer(&q, 0, &[], true), 9, TYPE_A),
            Err(Decoded::Truncated)
        );
        assert_eq!(
            decode_answer(&answer(&q, 0, &[], false), 10, TYPE_A),
            Err(Decoded::NotOurs)
        );
        // A referral (no recursion, not authoritative), and an alias alone.
        let mut referral = answer(&q, 0, &[], false);
        referral[3] &= 0x7f;
        assert!(
            matches!(decode_answer(&referral, 9, TYPE_A), Err(Decoded::Failed(e)) if e.contains("recurses"))
        );
        let mut authoritative = referral.clone();
        authoritative[2] |= 0x04;
        assert_eq!(decode_answer(&authoritative, 9, TYPE_A), Ok(vec![]));
        let alias = answer(&q, 0, &[(TYPE_CNAME, b"\x01x\x00")], false);
        assert!(
            matches!(decode_answer(&alias, 9, TYPE_A), Err(Decoded::Failed(e)) if e.contains("alias"))
        );
        // A record cut short, and an A record of the wrong length.
        let mut short = answer(&q, 0, &[(TYPE_A, &[10, 0, 0, 1])], false);
        short.truncate(short.len() - 2);
        assert!(matches!(
            decode_answer(&short, 9, TYPE_A),
            Err(Decoded::Failed(_))
        ));
        let odd = answer(&q, 0, &[(TYPE_A, &[10, 0, 0])], false);
        assert!(matches!(
            decode_answer(&odd, 9, TYPE_A),
            Err(Decoded::Failed(_))
        ));
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost_and_nothing_for_an_invalid_name() {
        let found = Resolver::System.lookup("localhost").await.unwrap();
        assert!(
            found.iter().all(|ip| ip.is_loopback()) && !found.is_empty(),
            "{found:?}"
        );
        // `.invalid` never resolves (RFC 6761); with no network the system
        // resolver may fail instead: either way no address comes back.
        let none = Resolver::System.lookup("spillway-test.invalid").await;
        assert!(none.as_ref().map_or(true, |a| a.is_empty()), "{none:?}");
    }
}
