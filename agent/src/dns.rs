//! Reading the question out of a DNS query the kernel copied. Sans-IO: the
//! first bytes of a DNS message in, the transaction id and first question
//! out. Only the header and question section are read, so a message cut
//! after the question (the kernel copies at most
//! [`agent_common::DNS_PAYLOAD_CAPACITY`] bytes) still parses.

use hickory_proto::{
    op::{Header, MessageType, Query},
    rr::RecordType,
    serialize::binary::{BinDecodable, BinDecoder},
};

/// The parts of a DNS query the agent reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsQuestion {
    pub transaction_id: u16,
    /// Presentation form, lower-case, without the root's final dot.
    pub name: String,
    /// Type mnemonic: "A", "AAAA", "TXT", or "TYPE<n>" for unnamed types.
    pub query_type: String,
    /// Questions the header announces.
    pub question_count: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsParseError {
    #[error("message is shorter than a DNS header")]
    ShortHeader,
    #[error("a response, not a query")]
    Response,
    #[error("the query has no question")]
    NoQuestion,
    #[error("malformed question: {0}")]
    Question(String),
}

/// Parses the header and first question of a DNS query message.
pub fn parse_query(message: &[u8]) -> Result<DnsQuestion, DnsParseError> {
    let mut decoder = BinDecoder::new(message);
    let header = Header::read(&mut decoder).map_err(|_| DnsParseError::ShortHeader)?;
    if header.metadata.message_type == MessageType::Response {
        return Err(DnsParseError::Response);
    }
    if header.counts.queries == 0 {
        return Err(DnsParseError::NoQuestion);
    }
    let query = Query::read(&mut decoder).map_err(|e| DnsParseError::Question(e.to_string()))?;
    let mut name = query.name().to_lowercase().to_utf8();
    if name.len() > 1 {
        // "example.org." -> "example.org"; the root stays ".".
        name.truncate(name.trim_end_matches('.').len());
    }
    Ok(DnsQuestion {
        transaction_id: header.metadata.id,
        name,
        query_type: match query.query_type() {
            // RFC 3597's presentation of types without a mnemonic.
            RecordType::Unknown(code) => format!("TYPE{code}"),
            known => known.to_string(),
        },
        question_count: header.counts.queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as a stub resolver sends it: id, RD, one question, and an
    /// EDNS OPT record after it.
    fn query(id: u16, labels: &[&[u8]], qtype: u16, flags: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
        for label in labels {
            m.push(label.len() as u8);
            m.extend_from_slice(label);
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        // OPT: root name, type 41, UDP size 1232, no options.
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        m
    }

    #[test]
    fn reads_the_first_question() {
        let m = query(0x1234, &[b"Files", b"Example", b"org"], 28, 0x0100);
        assert_eq!(
            parse_query(&m),
            Ok(DnsQuestion {
                transaction_id: 0x1234,
                name: "files.example.org".into(),
                query_type: "AAAA".into(),
                question_count: 1,
            })
        );
    }

    #[test]
    fn a_message_cut_after_the_question_still_parses() {
        let m = query(7, &[b"a", b"example"], 1, 0x0100);
        let question_end = m.len() - 11;
        let parsed = parse_query(&m[..question_end]).expect("question is complete");
        assert_eq!(parsed.name, "a.example");
        assert_eq!(parsed.query_type, "A");
    }

    #[test]
    fn unnamed_types_and_the_root_are_reported() {
        let m = query(9, &[], 65280, 0x0100);
        let parsed = parse_query(&m).expect("valid");
        assert_eq!(parsed.name, ".");
        assert_eq!(parsed.query_type, "TYPE65280");
    }

    #[test]
    fn malformed_messages_have_a_reason() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(DnsParseError::ShortHeader));
        let response = query(1, &[b"x"], 1, 0x8180);
        assert_eq!(parse_query(&response), Err(DnsParseError::Response));
        let mut no_question = query(1, &[b"x"], 1, 0x0100);
        no_question[5] = 0;
        assert_eq!(parse_query(&no_question), Err(DnsParseError::NoQuestion));
        // A label that runs past the end of the copied bytes.
        let cut = &query(1, &[b"abcdefgh"], 1, 0x0100)[..16];
        assert!(matches!(parse_query(cut), Err(DnsParseError::Question(_))));
    }
}
