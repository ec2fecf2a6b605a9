//! What authd reads of a CheckRequest, read from its bytes. Envoy sends every header of the
//! proxied request and authd looks at a few: the request's `attributes` are kept as they came
//! (a slice of the received buffer, no copy) and walked when asked, so nothing is decoded or
//! copied for the fields and headers authd does not read.
use prost::{
    bytes::{Buf, Bytes},
    encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field},
};

/// `envoy.service.auth.v3.CheckRequest` as authd decodes it: field 1, `attributes`
/// (`AttributeContext`), undecoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequestView {
    #[prost(bytes = "bytes", tag = "1")]
    pub attributes: Bytes,
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
/// order; the other fields are skipped.
fn each_field<'m>(
    message: &'m [u8],
    mut visit: impl FnMut(u32, &'m [u8]) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let mut buf = message;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if wire_type != WireType::LengthDelimited {
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

/// A map entry or a `HeaderValue`.
fn header(entry: &[u8], form: Form) -> Result<Header<'_>, Malformed> {
    let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    each_field(entry, |tag, field| {
        match tag {
            KEY => key = field,
            VALUE => value = field,
            RAW_VALUE if form == Form::List => raw = field,
            _ => {}
        }
        Ok(())
    })?;
    Ok(Header {
        key,
        value: if raw.is_empty() { value } else { raw },
        form,
    })
}

impl CheckRequestView {
    /// Every header of the proxied request, in the order sent (a message repeated on the wire
    /// merges, as protobuf merges it: its headers follow the earlier ones').
    pub fn headers(&self) -> Result<Vec<Header<'_>>, Malformed> {
        let mut headers = Vec::with_capacity(16);
        each_field(&self.attributes, |tag, request| {
            if tag != ATTRIBUTES_REQUEST {
                return Ok(());
            }
            each_field(request, |tag, http| {
                if tag != REQUEST_HTTP {
                    return Ok(());
                }
                each_field(http, |tag, field| {
                    match tag {
                        HTTP_HEADERS => headers.push(header(field, Form::Map)?),
                        HTTP_HEADER_MAP => each_field(field, |tag, value| {
                            if tag == HEADER_MAP_HEADERS {
                                headers.push(header(value, Form::List)?);
                            }
                            Ok(())
                        })?,
                        _ => {}
                    }
                    Ok(())
                })
            })
        })?;
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{AttributeContext, CheckRequest, attribute_context},
    };
    use prost::Message;

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
            .headers()
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
            .headers()
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

    #[test]
    fn bytes_that_are_not_the_messages_they_claim_are_malformed() {
        let request = full(&[("authorization", "Bearer abc")], &[]);
        let attributes = request.attributes.unwrap().encode_to_vec();
        let whole = CheckRequestView {
            attributes: Bytes::from(attributes.clone()),
        };
        let whole = whole.headers().unwrap();
        assert_eq!(whole.len(), 1);
        // Cut anywhere: never a panic, and never part of a header — all of it, or nothing
        // (a cut between the fields before it), or Malformed.
        for cut in 0..attributes.len() {
            let view = CheckRequestView {
                attributes: Bytes::copy_from_slice(&attributes[..cut]),
            };
            if let Ok(headers) = view.headers() {
                assert!(headers.is_empty() || headers == whole, "cut at {cut}");
            }
        }
        let lying = CheckRequestView {
            attributes: Bytes::from_static(&[0x22, 0x7f, 0x12]),
        };
        assert_eq!(lying.headers(), Err(Malformed));
    }
}
