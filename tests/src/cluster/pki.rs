//! The cluster's certificates, as kubeadm lays them out: one CA, the API server's serving
//! certificate, a client certificate per control-plane component and per kubelet (the Node
//! authorizer reads `system:node:<name>` in `system:nodes`), the kubelets' serving certificates,
//! and the service-account signing key. Made with the openssl command (P-256 keys).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::sh;

pub struct Pki {
    pub dir: PathBuf,
}

/// Who a certificate is for.
pub struct Subject<'a> {
    pub file: &'a str,
    /// Organisation (the RBAC group), if any.
    pub group: Option<&'a str>,
    /// Common name (the RBAC user).
    pub name: &'a str,
    /// `serverAuth`, `clientAuth`, or both.
    pub usage: &'a str,
    /// subjectAltName entries, e.g. `IP:192.168.77.254,DNS:kubernetes`.
    pub alt_names: &'a str,
}

impl Pki {
    /// A new CA and the service-account key pair in `dir`.
    pub fn create(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        pki.key("ca")?;
        sh(pki
            .openssl(&["req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt"])
            .args(["-days", "3650", "-subj", "/CN=sluice-lab-ca"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]))?;
        pki.key("service-account")?;
        sh(&mut pki.openssl(&[
            "pkey",
            "-in",
            "service-account.key",
            "-pubout",
            "-out",
            "service-account.pub",
        ]))?;
        Ok(pki)
    }

    fn openssl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(&self.dir);
        cmd
    }

    fn key(&self, file: &str) -> Result<()> {
        sh(&mut self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{file}.key"),
        ]))?;
        Ok(())
    }

    /// Issues `<file>.crt` and `<file>.key`, signed by the CA.
    pub fn issue(&self, subject: &Subject) -> Result<()> {
        let file = subject.file;
        self.key(file)?;
        let mut extensions = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,\
             keyEncipherment\nextendedKeyUsage={}\n",
            subject.usage
        );
        if !subject.alt_names.is_empty() {
            extensions += &format!("subjectAltName={}\n", subject.alt_names);
        }
        std::fs::write(self.dir.join(format!("{file}.ext")), extensions)?;
        let dn = match subject.group {
            Some(group) => format!("/O={group}/CN={}", subject.name),
            None => format!("/CN={}", subject.name),
        };
        let (key, csr, crt, ext) = (
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("{file}.crt"),
            format!("{file}.ext"),
        );
        sh(&mut self.openssl(&["req", "-new", "-key", &key, "-subj", &dn, "-out", &csr]))?;
        sh(&mut self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]))?;
        Ok(())
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A kubeconfig for `server` authenticating with the client certificate `<file>.crt`.
    pub fn kubeconfig(&self, server: &str, file: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: sluice-lab, cluster: {{server: \"{server}\", \
             certificate-authority: {ca}}}}}]\n\
             users: [{{name: {file}, user: {{client-certificate: {crt}, client-key: {key}}}}}]\n\
             contexts: [{{name: sluice-lab, context: {{cluster: sluice-lab, user: {file}}}}}]\n\
             current-context: sluice-lab\n",
            ca = self.path("ca.crt").display(),
            crt = self.path(&format!("{file}.crt")).display(),
            key = self.path(&format!("{file}.key")).display(),
        )
    }
}
