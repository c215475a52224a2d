#!/bin/sh
# What `make test` needs besides Python, said in one line before pytest runs:
# the tools the integration tests start (swaks, a private Postfix, saslpasswd2
# for its SASL users, testssl.sh, initdb for a private PostgreSQL, chromium for
# the console's browser tests) and root,
# which the private Postfix needs.
# .ci/run installs the same Debian packages; README.md names them.
missing=""
need_command() { # COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}
need_perl() { # MODULE PACKAGE: swaks's TLS
    perl -M"$1" -e 1 >/dev/null 2>&1 || missing="$missing $2"
}

need_command swaks swaks
need_perl Net::SSLeay libnet-ssleay-perl
need_perl IO::Socket::SSL libio-socket-ssl-perl
need_command postfix postfix
need_command saslpasswd2 sasl2-bin
plain=""
for module in /usr/lib/*/sasl2/libplain.so /usr/lib/sasl2/libplain.so; do
    [ -e "$module" ] && plain=yes
done
[ -n "$plain" ] || missing="$missing libsasl2-modules"
command -v testssl >/dev/null 2>&1 || command -v testssl.sh >/dev/null 2>&1 ||
    missing="$missing testssl.sh"

postgres=""
for initdb in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$initdb" ] && postgres=yes
done
[ -n "$postgres" ] || missing="$missing postgresql"
need_command chromium chromium  # the console's browser tests
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] ||
    missing="$missing fonts-dejavu-core"  # readable text in the console's screenshots
need_command rspamd rspamd  # the spam scanning tests start a private rspamd
need_command slapd slapd  # the recipient validation tests start a private LDAP directory
[ -x /usr/sbin/clamd ] || need_command clamd clamav-daemon  # the virus scanning tests start a private clamd
[ -x /usr/lib/dovecot/pop3 ] ||
    missing="$missing dovecot-pop3d"  # the POP3 fetch tests start a private Dovecot

root=""
[ "$(id -u 2>/dev/null)" = 0 ] || root="root (the tests run a private Postfix)"

if [ -n "$missing" ] && [ -n "$root" ]; then
    echo "make test needs $root and:$missing; sudo .ci/run installs them and runs the tests" >&2
elif [ -n "$missing" ]; then
    echo "make test needs:$missing; apt-get install$missing (or run .ci/run)" >&2
elif [ -n "$root" ]; then
    echo "make test needs $root: sudo make test" >&2
else
    exit 0
fi
exit 1
