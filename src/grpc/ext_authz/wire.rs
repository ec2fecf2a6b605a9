//! What authd reads of a CheckRequest, read from its bytes. Envoy sends every header of the
//! proxied request and authd looks at a few: the request's `attributes` are kept as they came
//! (a slice of the received buffer, no copy) and walked when asked, so nothing is decoded or
//! copied for the fields and headers authd does not read.
use prost::{
    bytes::{Buf, Bytes},
    encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field},
};

/// `envoy.service.auth.v3.CheckRequest` as authd decodes it: field 1, `attributes`
/// (`AttributeContext`), undecoded — every occurrence, in order, as protobuf merges a message
/// sent more than once.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequestView {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub attributes: Vec<Bytes>,
}

/// How Envoy sent a header: in `headers` (a map: a repeated header joined by `,`), or in
/// `header_map` (`encode_raw_headers`: one entry per occurrence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Map,
    List,
}

/// A header of the proxied request, as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub key: &'a [u8],
    /// `raw_value` when Envoy sent one, else `value`.
    pub value: &'a [u8],
    pub form: Form,
}

/// Bytes that are not the messages they claim to be.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl From<prost::DecodeError> for Malformed {
    fn from(_: prost::DecodeError) -> Self {
        Malformed
    }
}

// Field numbers: envoy/service/auth/v3/attribute_context.proto and
// envoy/config/core/v3/base.proto (vendored in proto-vendor/).
/// `AttributeContext.request`.
const ATTRIBUTES_REQUEST: u32 = 4;
/// `AttributeContext.Request.http`.
const REQUEST_HTTP: u32 = 2;
/// `AttributeContext.HttpRequest.headers` (map entries: key 1, value 2).
const HTTP_HEADERS: u32 = 3;
/// `AttributeContext.HttpRequest.header_map` (`HeaderMap`).
const HTTP_HEADER_MAP: u32 = 13;
/// `HeaderMap.headers` (`HeaderValue`: key 1, value 2, raw_value 3).
const HEADER_MAP_HEADERS: u32 = 1;
const KEY: u32 = 1;
const VALUE: u32 = 2;
const RAW_VALUE: u32 = 3;

/// Calls `visit` with each length-delimited field of `message` (its number and bytes), in
/// order; the other fields are skipped, but one of the numbers in `walked` (all
/// length-delimited in the schema) sent as another wire type is Malformed, as a full decode
/// would find it.
fn each_field<'m>(
    message: &'m [u8],
    walked: &[u32],
    mut visit: impl FnMut(u32, &'m [u8]) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let mut buf = message;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if wire_type != WireType::LengthDelimited {
            if walked.contains(&tag) {
                return Err(Malformed);
            }
            skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
            continue;
        }
        let len = usize::try_from(decode_varint(&mut buf)?).map_err(|_| Malformed)?;
        let (field, rest) = buf.split_at_checked(len).ok_or(Malformed)?;
        buf = rest;
        visit(tag, field)?;
    }
    Ok(())
}

/// A map entry or a `HeaderValue`. Its key and `value` are protobuf strings: not UTF-8 is
/// Malformed, as a full decode would find it (`raw_value` is bytes).
fn header(entry: &[u8], form: Form) -> Result<Header<'_>, Malformed> {
    let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    let walked: &[u32] = match form {
        Form::Map => &[KEY, VALUE],
        Form::List => &[KEY, VALUE, RAW_VALUE],
    };
    each_field(entry, walked, |tag, field| {
        match tag {
            KEY => key = field,
            VALUE => value = field,
            RAW_VALUE if form == Form::List => raw = field,
            _ => {}
        }
        Ok(())
    })?;
    if std::str::from_utf8(key).is_err() || std::str::from_utf8(value).is_err() {
        return Err(Malformed);
    }
    Ok(Header {
        key,
        value: if raw.is_empty() { value } else { raw },
        form,
    })
}

impl CheckRequestView {
    /// The headers of the proxied request whose name `wanted` takes, in the order sent (a
    /// message sent more than once merges, as protobuf merges it: its headers follow the
    /// earlier ones'). Every header is checked; only the wanted are kept, so what a request
    /// makes authd hold is bounded by what it names, not by how many headers it sends.
    pub fn headers<'a>(
        &'a self,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<Header<'a>>, Malformed> {
        let mut headers = Vec::new();
        let mut keep = |header: Header<'a>| {
            if wanted(header.key) {
                headers.push(header);
            }
        };
        for attributes in &self.attributes {
            each_field(attributes, &[ATTRIBUTES_REQUEST], |tag, request| {
                if tag != ATTRIBUTES_REQUEST {
                    return Ok(());
                }
                each_field(request, &[REQUEST_HTTP], |tag, http| {
                    if tag != REQUEST_HTTP {
                        return Ok(());
                    }
                    each_field(http, &[HTTP_HEADERS, HTTP_HEADER_MAP], |tag, field| {
                        match tag {
                            HTTP_HEADERS => keep(header(field, Form::Map)?),
                            HTTP_HEADER_MAP => {
                                each_field(field, &[HEADER_MAP_HEADERS], |tag, value| {
                                    if tag == HEADER_MAP_HEADERS {
                                        keep(header(value, Form::List)?);
                                    }
                                    Ok(())
                                })?
                            }
                            _ => {}
                        }
                        Ok(())
                    })
                })
            })?;
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{AttributeContext, CheckRequest, attribute_context},
    };
    use prost::{Message, encoding::WireType};

    use super::*;

    /// A CheckRequest with every field authd does not read set too, as Envoy fills them.
    fn full(headers: &[(&str, &str)], raw: &[(&str, &[u8])]) -> CheckRequest {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
        let address = Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "203.0.113.7".into(),
                ..Default::default()
            })),
        });
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    address: address.clone(),
                    principal: "spiffe://shop/frontend".into(),
                    ..Default::default()
                }),
                destination: Some(attribute_context::Peer {
                    address,
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    time: Some(Default::default()),
                    http: Some(attribute_context::HttpRequest {
                        id: "1".into(),
                        method: "GET".into(),
                        path: "/orders?page=2".into(),
                        host: "shop.example".into(),
                        size: 42,
                        headers: headers
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        header_map: (!raw.is_empty()).then(|| HeaderMap {
                            headers: raw
                                .iter()
                                .map(|(k, v)| HeaderValue {
                                    key: (*k).to_owned(),
                                    raw_value: v.to_vec(),
                                    ..Default::default()
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }),
                }),
                context_extensions: [("route".to_owned(), "orders".to_owned())].into(),
                ..Default::default()
            }),
        }
    }

    fn view(request: &CheckRequest) -> CheckRequestView {
        CheckRequestView::decode(request.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn the_headers_read_from_the_bytes_are_those_prost_decodes() {
        let headers = [
            ("authorization", "Bearer abc"),
            (":path", "/orders"),
            ("cookie", "sid=T; theme=dark"),
            ("user-agent", "Mozilla/5.0 \u{e9}"),
        ];
        let request = full(&headers, &[]);
        let mapped = view(&request);
        let mut read: Vec<(String, String)> = mapped
            .headers(|_| true)
            .unwrap()
            .iter()
            .map(|h| {
                assert_eq!(h.form, Form::Map);
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                (text(h.key), text(h.value))
            })
            .collect();
        read.sort();
        let mut sent: Vec<(String, String)> = request
            .attributes
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap()
            .headers
            .into_iter()
            .collect();
        sent.sort();
        assert_eq!(read, sent);

        let raw: [(&str, &[u8]); 3] =
            [("cookie", b"a=1"), ("cookie", b"sid=T"), ("x-bin", b"\xff")];
        let request = full(&[], &raw);
        let listed = view(&request);
        let read: Vec<(&[u8], &[u8], Form)> = listed
            .headers(|_| true)
            .unwrap()
            .iter()
            .map(|h| (h.key, h.value, h.form))
            .collect();
        let expected: Vec<(&[u8], &[u8], Form)> = raw
            .iter()
            .map(|(k, v)| (k.as_bytes(), *v, Form::List))
            .collect();
        assert_eq!(read, expected, "in order, raw values as sent");
    }

    /// `body` as field `tag` (length-delimited).
    fn field(tag: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
    type Decoded = Result<CheckRequest, prost::DecodeError>;

    /// `attributes` (each an AttributeContext) as one CheckRequest, read both ways: authd's
    /// walk (every header kept) and a full prost decode.
    fn both_ways(attributes: &[Vec<u8>]) -> (Result<Pairs, Malformed>, Decoded) {
        let wire: Vec<u8> = attributes.iter().flat_map(|a| field(1, a)).collect();
        let view = CheckRequestView::decode(wire.as_slice()).unwrap();
        let ours = view.headers(|_| true).map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_vec(), h.value.to_vec()))
                .collect()
        });
        (ours, CheckRequest::decode(wire.as_slice()))
    }

    /// The proxied request of a full decode that succeeded.
    fn http_of(decoded: Decoded) -> attribute_context::HttpRequest {
        let attributes = decoded.unwrap().attributes.unwrap();
        attributes.request.unwrap().http.unwrap()
    }

    /// An AttributeContext whose request carries these `headers` map entries.
    fn with_entries(entries: &[Vec<u8>]) -> Vec<u8> {
        let http: Vec<u8> = entries.iter().flat_map(|e| field(3, e)).collect();
        field(4, &field(2, &http))
    }

    fn entry(key: &[u8], value: &[u8]) -> Vec<u8> {
        [field(1, key), field(2, value)].concat()
    }

    #[test]
    fn what_a_canonical_encoder_never_writes_is_read_as_a_full_decode_reads_it() {
        // An AttributeContext sent twice merges: the first copy's headers are not lost (a
        // forged identity header there is still seen).
        let forged = with_entries(&[entry(b"x-authd-user-id", b"admin")]);
        let token = with_entries(&[entry(b"authorization", b"Bearer T")]);
        let (ours, full) = both_ways(&[forged, token]);
        let full = http_of(full);
        let ours = ours.unwrap();
        assert_eq!(ours.len(), 2);
        for (key, value) in &ours {
            let key = String::from_utf8(key.clone()).unwrap();
            assert_eq!(full.headers[&key].as_bytes(), value.as_slice(), "{key}");
        }
        // A key twice in the map: the last is the one (authd's lookup takes the last).
        let twice = with_entries(&[
            entry(b"authorization", b"Bearer a"),
            entry(b"authorization", b"Bearer b"),
        ]);
        let (ours, full) = both_ways(&[twice]);
        let full = http_of(full);
        assert_eq!(full.headers["authorization"], "Bearer b");
        assert_eq!(ours.unwrap().last().unwrap().1, b"Bearer b");
        // Refused by both: a walked field of another wire type, a string that is not UTF-8, a
        // length past the end.
        let mut varint_headers = Vec::new();
        prost::encoding::encode_key(3, WireType::Varint, &mut varint_headers);
        prost::encoding::encode_varint(1, &mut varint_headers);
        let mut fixed_request = Vec::new();
        prost::encoding::encode_key(4, WireType::SixtyFourBit, &mut fixed_request);
        fixed_request.extend_from_slice(&[0; 8]);
        for bad in [
            field(4, &field(2, &varint_headers)),
            fixed_request,
            with_entries(&[entry(b"authorization", b"Bearer \xff")]),
            with_entries(&[entry(b"\xc3", b"v")]),
            vec![0x22, 0x7f, 0x12],
        ] {
            let (ours, full) = both_ways(std::slice::from_ref(&bad));
            assert_eq!(ours, Err(Malformed), "{bad:?}");
            assert!(full.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_cut_anywhere_is_refused_exactly_when_a_full_decode_refuses_it() {
        let request = full(&[("authorization", "Bearer abc")], &[("cookie", b"sid=T")]);
        let attributes = request.attributes.unwrap().encode_to_vec();
        for cut in 0..=attributes.len() {
            let (ours, full) = both_ways(&[attributes[..cut].to_vec()]);
            assert_eq!(ours.is_ok(), full.is_ok(), "cut at {cut}");
        }
    }
}
