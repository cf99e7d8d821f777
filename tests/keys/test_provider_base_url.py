"""A provider's base_url is a plain http(s) URL: no credentials (httpx would send them as Basic
auth instead of the key), no query string or fragment (the paths the proxy appends would land in
them). The admin and import_config refuse the same URLs with the same messages."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from keys.config_io import ConfigError, config_import
from keys.models import Provider

pytestmark = pytest.mark.django_db

CREDENTIALS = "base_url must not contain credentials; put the key in an API key"
QUERY = "base_url must not contain a query string or fragment"
SCHEME = "base_url must start with http:// or https://"
REFUSED = [
    ("https://user:pass@api.example.com/v1", CREDENTIALS),
    ("https://sk-secret@api.example.com/v1", CREDENTIALS),
    ("https://api.example.com/v1?api-version=2024-06-01", QUERY),
    ("https://api.example.com/v1#frag", QUERY),
    ("https://api.example.com/v1?", QUERY),
    ("ftp://files.example.com/v1", SCHEME),
]


def add_provider(client: Client, base_url: str) -> str:
    data = {
        "name": "p",
        "kind": "openai",
        "base_url": base_url,
        "enabled": "on",
        "cooldown_seconds": "30",
        "quarantine_seconds": "300",
        "exhausted_seconds": "3600",
    }
    return client.post(reverse("admin:keys_provider_add"), data, follow=True).content.decode()


@pytest.mark.parametrize(("base_url", "message"), REFUSED)
def test_the_admin_refuses_a_base_url_with_credentials_a_query_or_another_scheme(
    admin_client: Client, base_url: str, message: str
) -> None:
    page = add_provider(admin_client, base_url)
    assert message in page
    assert not Provider.objects.exists()


def test_the_admin_takes_the_same_url_once_the_credentials_are_out(admin_client: Client) -> None:
    assert CREDENTIALS in add_provider(admin_client, "http://user:pw@10.0.0.5:8080/v1")
    add_provider(admin_client, "http://10.0.0.5:8080/v1")  # an internal host is fine
    assert Provider.objects.get().base_url == "http://10.0.0.5:8080/v1"


@pytest.mark.parametrize(("base_url", "message"), REFUSED)
def test_import_config_refuses_the_same_base_urls(base_url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_import(data={"providers": {"p": {"kind": "openai", "base_url": base_url}}})
    assert raised.value.errors == [f"providers.p.base_url: {message}"]
    assert not Provider.objects.exists()
