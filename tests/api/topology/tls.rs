//! Certificates minted on the fly, and a TLS-only Redis using them.
#![allow(dead_code)]

use super::*;

/// Certificates for TLS tests, minted with rcgen (ECDSA P-256) and written as PEM files in a temp
/// dir of their own:
///
/// - `ca_*`: a CA;
/// - `server_*`: a server certificate for `localhost` and `127.0.0.1`, signed by the CA;
/// - `client_*`: a client certificate signed by the CA, with the SANs given to
///   [`Certs::with_client`] (by default DNS [`Certs::CLIENT_DNS`] and URI [`Certs::CLIENT_URI`]);
/// - `other_ca_*`: an unrelated CA (the "wrong CA"), which signed none of them.
///
/// [`Certs::client`] and [`Certs::other_client`] mint more client certificates.
pub struct Certs {
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub other_ca_file: PathBuf,
    pub other_ca_pem: String,
    pub(crate) ca: Issuer<'static, KeyPair>,
    pub(crate) other_ca: Issuer<'static, KeyPair>,
    pub(crate) minted: AtomicUsize,
    pub(crate) dir: TempDir,
}

/// A self-signed CA: its certificate's PEM and what signs with it.
pub(crate) fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "authd tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let key = KeyPair::generate().expect("generate a key");
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate signed by `issuer`: its PEM and its key's PEM (PKCS#8).
pub(crate) fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let key = KeyPair::generate().expect("generate a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("sign the certificate");
    (cert.pem(), key.serialize_pem())
}

pub(crate) fn client_sans(dns: &[&str], uris: &[&str]) -> Vec<SanType> {
    let dns = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().expect("a DNS name in ASCII")));
    let uris = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("a URI in ASCII")));
    dns.chain(uris).collect()
}

impl Certs {
    /// The client certificate's DNS SAN by default.
    pub const CLIENT_DNS: &str = "client.example.org";
    /// The client certificate's URI SAN by default.
    pub const CLIENT_URI: &str = "spiffe://example.org/ns/a/sa/b";

    /// A CA, a server certificate, a client certificate with DNS SAN [`Certs::CLIENT_DNS`] and
    /// URI SAN [`Certs::CLIENT_URI`], and a wrong CA.
    pub fn new() -> Certs {
        Self::with_client(&[Self::CLIENT_DNS], &[Self::CLIENT_URI])
    }

    /// As [`Certs::new`], the client certificate with these DNS and URI SANs (either may be
    /// empty).
    pub fn with_client(dns: &[&str], uris: &[&str]) -> Certs {
        let dir = temp_dir("authd-certs-");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let (ca_pem, ca) = new_ca("authd test CA");
        let (other_ca_pem, other_ca) = new_ca("authd test wrong CA");
        let (server_cert_pem, server_key_pem) = new_leaf(
            &ca,
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = new_leaf(
            &ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Certs {
            ca_file: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert_pem),
            server_key: write("server-key.pem", &server_key_pem),
            client_cert: write("client.pem", &client_cert_pem),
            client_key: write("client-key.pem", &client_key_pem),
            other_ca_file: write("other-ca.pem", &other_ca_pem),
            ca_pem,
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem,
            ca,
            other_ca,
            minted: AtomicUsize::new(0),
            dir,
        }
    }

    /// The temp dir the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a minted certificate and key, returning their paths.
    pub(crate) fn write_pair(
        &self,
        kind: &str,
        (cert, key): (String, String),
    ) -> (PathBuf, PathBuf) {
        let n = self.minted.fetch_add(1, Ordering::SeqCst);
        let cert_path = self.dir.path().join(format!("{kind}-{n}.pem"));
        let key_path = self.dir.path().join(format!("{kind}-{n}-key.pem"));
        std::fs::write(&cert_path, cert).expect("write a PEM file");
        std::fs::write(&key_path, key).expect("write a PEM file");
        (cert_path, key_path)
    }

    /// A new client certificate and key (PEM), signed by the CA, with these DNS and URI SANs; its
    /// common name is the first DNS name, if any.
    pub fn client_pem(&self, dns: &[&str], uris: &[&str]) -> (String, String) {
        new_leaf(
            &self.ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// As [`Certs::client_pem`], written to files: `(cert_path, key_path)`.
    pub fn client(&self, dns: &[&str], uris: &[&str]) -> (PathBuf, PathBuf) {
        self.write_pair("client", self.client_pem(dns, uris))
    }

    /// A client certificate like [`Certs::client`]'s but signed by the wrong CA.
    pub fn other_client(&self, dns: &[&str], uris: &[&str]) -> (PathBuf, PathBuf) {
        let pair = new_leaf(
            &self.other_ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        self.write_pair("other-client", pair)
    }

    /// A server certificate for `localhost` and `127.0.0.1` signed by the wrong CA, for a server
    /// that clients trusting [`Certs::ca_file`] must refuse: `(cert_path, key_path)`.
    pub fn other_server(&self) -> (PathBuf, PathBuf) {
        let pair = new_leaf(
            &self.other_ca,
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        self.write_pair("other-server", pair)
    }
}

/// How a [`TlsRedis`] is set up beyond TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// `--tls-auth-clients yes` (a client must present a certificate signed by the CA) rather than
    /// `optional` (one it presents is checked, none is fine).
    pub require_client_cert: bool,
    /// `--requirepass`: the `default` user's password.
    pub requirepass: Option<String>,
    /// ACL users `(name, password)`, each `on >PASSWORD ~* &* +@all`.
    pub users: Vec<(String, String)>,
    /// `user default off`: only the ACL users may do anything.
    pub disable_default_user: bool,
    /// The server's certificate and key instead of [`Certs::server_cert`] (e.g.
    /// [`Certs::other_server`]).
    pub server_cert: Option<(PathBuf, PathBuf)>,
    /// More `redis-server` arguments.
    pub extra: Vec<String>,
}

/// A redis-server that speaks only TLS (`--port 0 --tls-port P`), with the [`Certs`] it was started
/// with: the server certificate, and the CA to check client certificates against.
pub struct TlsRedis {
    pub port: u16,
    pub(crate) ca_file: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    pub(crate) proc: Proc,
    pub(crate) dir: TempDir,
}

impl TlsRedis {
    /// A TLS server that requires a client certificate (`require_client_cert`) or takes one if
    /// given, without passwords.
    pub async fn start(certs: &Certs, require_client_cert: bool) -> TlsRedis {
        Self::start_with(
            certs,
            TlsOptions {
                require_client_cert,
                ..TlsOptions::default()
            },
        )
        .await
    }

    /// A TLS server set up as `options` say. Ready once `redis-cli --tls` (with the CA and the
    /// client certificate) gets PONG, or NOAUTH.
    pub async fn start_with(certs: &Certs, options: TlsOptions) -> TlsRedis {
        let dir = temp_dir("authd-tls-redis-");
        let path = dir.path().to_owned();
        let (cert, key) = options
            .server_cert
            .clone()
            .unwrap_or_else(|| (certs.server_cert.clone(), certs.server_key.clone()));
        let args = |port: u16| {
            let mut args: Vec<String> = [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                &path_str(&cert),
                "--tls-key-file",
                &path_str(&key),
                "--tls-ca-cert-file",
                &path_str(&certs.ca_file),
                "--tls-auth-clients",
                if options.require_client_cert {
                    "yes"
                } else {
                    "optional"
                },
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &path_str(&path),
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(password) = &options.requirepass {
                args.extend(["--requirepass".to_owned(), password.clone()]);
            }
            for (user, password) in &options.users {
                args.extend(
                    [
                        "--user",
                        user,
                        "on",
                        &format!(">{password}"),
                        "~*",
                        "&*",
                        "+@all",
                    ]
                    .map(str::to_owned),
                );
            }
            if options.disable_default_user {
                args.extend(["--user", "default", "off"].map(str::to_owned));
            }
            args.extend(options.extra.iter().cloned());
            args
        };
        // A server certificate from elsewhere need not chain to the CA: skip checking it then.
        let trust = match options.server_cert {
            None => vec!["--cacert".to_owned(), path_str(&certs.ca_file)],
            Some(_) => vec!["--insecure".to_owned()],
        };
        let probe = |port: u16| {
            let mut cli = vec!["--tls".to_owned()];
            cli.extend(trust.iter().cloned());
            cli.extend(
                [
                    "--cert",
                    &path_str(&certs.client_cert),
                    "--key",
                    &path_str(&certs.client_key),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "ping",
                ]
                .map(str::to_owned),
            );
            Probe::Cli(cli)
        };
        let proc = Proc::start(&path, "tls-redis", free_port, args, probe).await;
        TlsRedis {
            port: proc.port,
            ca_file: certs.ca_file.clone(),
            client_cert: certs.client_cert.clone(),
            client_key: certs.client_key.clone(),
            proc,
            dir,
        }
    }

    /// `rediss://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs `redis-cli --tls --cacert CA --cert CLIENT --key CLIENT_KEY -h 127.0.0.1 -p P` then
    /// `args` (which may start with more options, e.g. `--user NAME --pass PW`).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let port = self.port.to_string();
        let (ca, cert, key) = (
            path_str(&self.ca_file),
            path_str(&self.client_cert),
            path_str(&self.client_key),
        );
        let mut all = vec![
            "--tls",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
        ];
        all.extend_from_slice(args);
        redis_cli(&all).await
    }

    /// The tail of the server's log.
    pub fn logs(&self) -> String {
        self.proc.log_tail(30)
    }

    /// SIGKILLs the server.
    pub fn kill(&self) {
        self.proc.kill();
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.proc.kill();
    }
}
