// The OpenID Provider the OIDC sign-in tests start: the npm package `oidc-provider` (OpenID-certified) with one
// static client, a few test accounts with a `groups` claim, and its development sign-in page (any password).
//
// Run: node tests/oidc/provider.mjs, with
//   OIDC_MODULES    the folder whose node_modules holds oidc-provider (the cache that tests/oidc.py fills)
//   OIDC_PORT       the port to listen on (127.0.0.1)
//   OIDC_CLIENT     JSON: {client_id, client_secret}
// It prints "listening <issuer>" once it serves discovery.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.OIDC_MODULES;
const port = Number(process.env.OIDC_PORT);
const client = JSON.parse(process.env.OIDC_CLIENT);
const { default: Provider } = await import(
  pathToFileURL(join(modules, "node_modules", "oidc-provider", "lib", "index.js")).href);

// who can sign in: the account id is what is typed as the login; the password is not checked (dev interactions)
const ACCOUNTS = {
  alice: { preferred_username: "alice", name: "Alice Admin", email: "alice@example.test",
           groups: ["appliance-admins", "staff"] },
  bob: { preferred_username: "bob", name: "Bob Builder", email: "bob@example.test", groups: ["staff"] },
  carol: { preferred_username: "carol", name: "Carol Auditor", email: "carol@example.test",
           groups: ["appliance-auditors"] },
  dave: { preferred_username: "dave", name: "Dave Admin", email: "dave@example.test", groups: ["appliance-admins"] },
  // a name that a local user of the appliance already has: signing in must not take that account over
  local: { preferred_username: "local-admin", name: "Not The Local Admin", groups: ["appliance-admins"] },
};

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  // the appliance as a confidential client (its secret from `appliance oidc set-secret`), and as a public one
  // (`<client_id>-public`: no secret, PKCE alone)
  clients: [{ ...client, token_endpoint_auth_method: "client_secret_basic" },
            { client_id: `${client.client_id}-public`, token_endpoint_auth_method: "none" }].map((c) => ({
    ...c,
    redirect_uris: ["http://127.0.0.1/api/auth/oidc/callback"],
    post_logout_redirect_uris: ["http://127.0.0.1/ui/"],
    client_name: "Appliance",
    response_types: ["code"],
    grant_types: ["authorization_code"],
  })),
  pkce: { required: () => true },  // S256 is the only method oidc-provider 9 accepts
  scopes: ["openid", "profile", "email", "groups"],
  claims: { openid: ["sub"], profile: ["preferred_username", "name"], email: ["email"], groups: ["groups"] },
  cookies: { keys: ["test-only-cookie-key-0123456789abcdef"] },
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
  // the appliance is this provider's own first-party client: no consent screen (as most providers set up their own
  // apps); what the grant holds is what the client asked for
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId,
                                                 accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope(ctx.oidc.params.scope);
    await grant.save();
    return grant;
  },
  async findAccount(ctx, id) {
    const claims = ACCOUNTS[id];
    if (!claims) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...claims }; } };
  },
});
provider.proxy = false;
// the appliances under test listen on ports chosen when they start, after this provider: their callback and sign-out
// landing page are allowed on any loopback port (a real provider registers the exact URLs)
const loopback = (path) => (value) => {
  const url = URL.parse(value);
  return url !== null && url.protocol === "http:" && url.hostname === "127.0.0.1" && url.pathname === path
    && !url.search && !url.hash;
};
provider.Client.prototype.redirectUriAllowed = loopback("/api/auth/oidc/callback");
provider.Client.prototype.postLogoutRedirectUriAllowed = loopback("/ui/");

// the test's own logs stay readable: oidc-provider's development warnings go once to stderr
provider.listen(port, "127.0.0.1", () => {
  process.stdout.write(`listening ${issuer}\n`);
});
